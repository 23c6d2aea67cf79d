"""Freezing and partitioning write the same bytes however the work is split in memory.

The digests below are the files these fixtures give; a snapshot id, quarantine or
partition file that changed for the same input would give every user a new grant
key order, a new snapshot id and a ledger that no longer matches its partitions.
Each case runs with the default working-set size and with tiny ones, which split
the input into many spill files, bucket groups and id ranges.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.grants import freezing
from pipeline.grants.partitioning import partition_snapshot, partitions_dir
from pipeline.grants.snapshot import freeze_snapshot

CAMPAIGN = "bytes"


def _ids(rng: random.Random, count: int) -> list[int]:
    """Distinct positive ids: a dense range with gaps, a far range, and a few extremes."""
    ids: list[int] = []
    current = 10_000_000
    while len(ids) < count - 3:
        current += rng.choice((1, 1, 1, 2, 3, 40))
        ids.append(current if rng.random() > 0.02 else 3_000_000_000 + current)
    return ids + [1, 2**62 + 12345, 2**63 - 1]


def _shuffled(rng: random.Random, values: list[object]) -> list[object]:
    rng.shuffle(values)
    return values


def write_inputs(folder: Path) -> dict[str, tuple[Path, Path | None]]:
    """Every fixture input: (user file, exclusion file or None) by case name."""
    rng = random.Random(20230105)
    folder.mkdir(parents=True, exist_ok=True)
    big = _ids(rng, 1_200_000)
    rows: list[object] = [*big, *big[:5000], *big[100:110], *[None] * 20, 0, -7, -(2**63)]
    pq.write_table(pa.table({"user_id": pa.array(_shuffled(rng, rows), pa.int64())}), folder / "int.parquet")
    excluded = rng.sample(big, 700) + [5, 6, 7]
    pq.write_table(pa.table({"user_id": pa.array(excluded, pa.int64())}), folder / "exclude.parquet")

    small = _ids(rng, 20_000)
    texts: list[object] = [*(str(v) for v in small), f" {small[0]}", f"+{small[1]}", f"0{small[2]}", str(small[3])]
    texts += ["abc", "12.5", "", "9223372036854775808", "-3", "0", " ", "1e5"]
    csv_rows = _shuffled(rng, texts)
    (folder / "text.csv").write_text(
        "name,user_id\n" + "".join(f"x,{'' if v is None else v}\n" for v in csv_rows), encoding="utf-8"
    )
    (folder / "exclude.csv").write_text("user_id\n" + "".join(f"{v}\n" for v in small[:50]), encoding="utf-8")
    pq.write_table(pa.table({"user_id": pa.array(csv_rows, pa.string())}), folder / "text.parquet")

    floats: list[object] = [float(v) for v in small[:3000]] + [2.5, float("nan"), None, -1.0, 1e19, float(small[7])]
    pq.write_table(pa.table({"user_id": pa.array(_shuffled(rng, floats), pa.float64())}), folder / "float.parquet")
    unsigned: list[object] = [*small[:3000], 2**63, 2**64 - 1, small[9], 0]
    pq.write_table(pa.table({"user_id": pa.array(_shuffled(rng, unsigned), pa.uint64())}), folder / "uint.parquet")
    clean = _ids(rng, 5000)
    pq.write_table(pa.table({"user_id": pa.array(_shuffled(rng, list(clean)), pa.int64())}), folder / "clean.parquet")
    return {
        "clean": (folder / "clean.parquet", None),
        "int": (folder / "int.parquet", folder / "exclude.parquet"),
        "csv": (folder / "text.csv", folder / "exclude.csv"),
        "text": (folder / "text.parquet", None),
        "float": (folder / "float.parquet", None),
        "uint": (folder / "uint.parquet", None),
    }


PARTITION_COUNTS = {"clean": (2,), "int": (1, 2, 7), "csv": (3,), "text": (1,), "float": (2,), "uint": (1,)}


def digests(home: Path, case: str, user_file: Path, exclusions: Path | None, **sizes: int) -> dict[str, str]:
    """sha256 of every file freezing and partitioning ``user_file`` writes, by path under the snapshot."""
    report = freeze_snapshot(user_file, home, CAMPAIGN, exclusions, rejected_share_max=0.5, **sizes)  # type: ignore[arg-type]
    for count in PARTITION_COUNTS[case]:
        partition_snapshot(report.users_file, partitions_dir(report.location, count), count, **sizes)  # type: ignore[arg-type]
    root = Path(report.directory)
    found = {"snapshot_id": report.snapshot_id}
    for path in sorted(root.rglob("*.parquet")):
        found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# What freezing and partitioning wrote for these fixtures when the whole file was sorted in memory.
GOLDEN: dict[str, dict[str, str]] = {
    "clean": {
        "snapshot_id": "363aca4fa8d7d786",
        "partitions-0002/manifest.parquet": "50892af43df47ac4431df4b00a926619129b4331bba222210a6d073bd5470e43",
        "partitions-0002/part-0000.parquet": "0e05948df0cce20e0d3c09e1565edb4acb14658403aed355f4a0da4a287a74aa",
        "partitions-0002/part-0001.parquet": "d38b567cb07cd198561e0c51a521e5901b67a9d1272d8112c74167a531dd2261",
        "quarantine.parquet": "04d7aa2f872e30286ab5258f36ab96a4a47cd63c436a75eb6756c50d96e80043",
        "users.parquet": "f9c541080fb9760e1589b7beb4241cbaf02db2cd30ec324e1b6c1df88b38a55e",
    },
    "int": {
        "snapshot_id": "708495c8b77d4fe3",
        "excluded.parquet": "d0832acb01ef0927e31583b6febf590d05773eb3f6b4995191851b7952d3619a",
        "partitions-0001/manifest.parquet": "61a4f6cad104ed7f2122fb055bbcef3ef5916a67761fe1040a95aaa75542dc19",
        "partitions-0001/part-0000.parquet": "3f5dfffba3d92384ad23f31c5b95b7fe4c66c6abfa62b86903325ef4657c2721",
        "partitions-0002/manifest.parquet": "0d7667b1d9ab763e1897a8b029a080c07c051d864e627d35b47d4565420636ba",
        "partitions-0002/part-0000.parquet": "1c9e551efd737e2e8e7bcb6e8cceaefdfb0b0fab50322ba4c4c8a6ebc2b6431e",
        "partitions-0002/part-0001.parquet": "e30b2c83ceea0e30ebf77b66bfb94bf2b16e28b8eef903ee939ab0c682dc607b",
        "partitions-0007/manifest.parquet": "807112444813ebf4506b85e70ad63cd497cdbc1980cc33ad00dcc255ec333201",
        "partitions-0007/part-0000.parquet": "99b94779412cac840e6920939b219ce26cafc43bb9bbb48850c9d68d9bf16f66",
        "partitions-0007/part-0001.parquet": "ec53b5deae15be38547047229f8eab1bf7d9df877dce0343caac3f3ede06375b",
        "partitions-0007/part-0002.parquet": "943a1883eacc0f5c5d4cf52ddd317181c713e7616e1fa483dece9ea6faf35b36",
        "partitions-0007/part-0003.parquet": "ba8cd94c4341ef54cd028e0c3a490cce0d46b889c58da4151e1864c4395a45c0",
        "partitions-0007/part-0004.parquet": "5a8b4c3c6bbd5a7629db09b80c647c2a80c9418cbd87208e283ba6183c77dff8",
        "partitions-0007/part-0005.parquet": "5856b53aa388590c7c8e04b01b788ad72b9106814dd316d354cdbf93951b3b63",
        "partitions-0007/part-0006.parquet": "ee1c4408db8ea2eacfba8317ccf6432eeaf49cfb1ef90ff9e3c2ab28b10fd7b3",
        "quarantine.parquet": "47f7a728ab257da79b7d71e0dbaf6ec4ff87631fcc6c1771c19ebbc0f8604175",
        "users.parquet": "936f18de09139c184f8b6d1eccfb1bed1954f02740f21e14b78a459615a458ab",
    },
    "csv": {
        "snapshot_id": "9eee3558240f84d8",
        "excluded.parquet": "8680ab99cbd09f5e030be4af1deabbd426ff903a3d73531a0d6fc12b9fd7da16",
        "partitions-0003/manifest.parquet": "25d3d46b9a468447a023dd1d1e95ce92296b0471a913118175fb1e22ddbc1c48",
        "partitions-0003/part-0000.parquet": "8978e2b1251a35b598d05893cf6808811fce4c215bde19c3d537ad0d5d769a27",
        "partitions-0003/part-0001.parquet": "17f4573bf373f17a404119b65b6ba7c05e26cd701a43d4073c4c1fb67e8664eb",
        "partitions-0003/part-0002.parquet": "8ca53e95c00a38668c3b72774569b1dbf1d09d1410d0a15f1d946cab2a6abc44",
        "quarantine.parquet": "6f9bb327fcd24805d6db07e0b221659acfa1b4cd7ce771db17509dd577db7c75",
        "users.parquet": "37ec89acdd3016b527e9fa2e939dccd2b87800fed064b8ed4da67d0ba836471a",
    },
    "text": {
        "snapshot_id": "a50660f592c322c4",
        "partitions-0001/manifest.parquet": "9f81b7c4a3ca9e57e2924d9eb8feca72c8ab7272d1bfc5f70117c44ecd3d3f64",
        "partitions-0001/part-0000.parquet": "199ff40fbbb23a3308185f8abdd1829101474589c8a75c36c4cc2a8c570210ab",
        "quarantine.parquet": "d5b41a114d732ba4f0e9d77f07a7cc5083b7bffd24cc3b20c3ef8974a35c87d8",
        "users.parquet": "848eb5b81b58aa754b66517fbf5ce78758a2672fd242ea01cc7ccac467bde94a",
    },
    "float": {
        "snapshot_id": "fc4874e75ba68a2f",
        "partitions-0002/manifest.parquet": "9acd0295b24c740cf0a1d12addb86d46cb6248b32de274a9a7b084cf55cf02cd",
        "partitions-0002/part-0000.parquet": "87c6e41a3ace32c45ebb9c5f08e9a886ddd9ee29915032b45a4690a0c4fcd72f",
        "partitions-0002/part-0001.parquet": "9b2dd403fd025586f2786f1a74a26442ef8abd2fa1b941238b46ad72c7c5654d",
        "quarantine.parquet": "5e1181d8422a3a5bfd5029551a2b3d1f40ac118c7b60ae52fc1e40c92c8bd6f9",
        "users.parquet": "ededbfc2ca222a6ba6412ae48ad4204a8bf2cb8144fdc4e1331c96870188849e",
    },
    "uint": {
        "snapshot_id": "fc4874e75ba68a2f",
        "partitions-0001/manifest.parquet": "5f188f5c929a348d7f5683cc35e3124e3edcbd543219c36dd45e9af2c349299b",
        "partitions-0001/part-0000.parquet": "79c5b0b5cc0c922a856ebcbaa4e956ff5b3606c0677e03ff225da7b1e7fef31b",
        "quarantine.parquet": "3ccc702c329d2ff0f9d6f6344cf9edea39ef350d7d2e0e3368d252523835f4b3",
        "users.parquet": "ededbfc2ca222a6ba6412ae48ad4204a8bf2cb8144fdc4e1331c96870188849e",
    },
}

# Working sets small enough to split every case into several groups, id ranges and quarantine steps.
SMALL_SIZES = {"clean": 1000, "int": 150_000, "csv": 1000, "text": 1000, "float": 500, "uint": 3}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[Path, Path | None]]]:
    folder = tmp_path_factory.mktemp("inputs")
    cwd = Path.cwd()
    try:
        os.chdir(folder)  # relative names: the quarantine records the user file as it was given
        return folder, write_inputs(Path("in"))
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("split", ["default", "small"])
@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_files_are_byte_for_byte_the_in_memory_ones(
    case: str,
    split: str,
    inputs: tuple[Path, dict[str, tuple[Path, Path | None]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, cases = inputs
    monkeypatch.chdir(folder)
    sizes = {"rows_in_memory": SMALL_SIZES[case]} if split == "small" else {}
    user_file, exclusions = cases[case]
    assert digests(tmp_path, case, user_file, exclusions, **sizes) == GOLDEN[case]


def test_small_split_really_splits(
    inputs: tuple[Path, dict[str, tuple[Path, Path | None]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The small working set spills several groups and ranges (else the test above proves little)."""
    folder, cases = inputs
    monkeypatch.chdir(folder)
    seen: list[int] = []
    real = freezing._deduplicate

    def counting(*args: object, **kwargs: object) -> object:
        seen.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(freezing, "_deduplicate", counting)
    report = freeze_snapshot(cases["int"][0], tmp_path, CAMPAIGN, rows_in_memory=150_000)
    assert len(seen) >= 8  # 1.2 million rows in groups of at most 150,000
    assert report.eligible_users == 1_200_000


if __name__ == "__main__":  # prints the digests of the current implementation
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)  # the quarantine names the user file as given: a relative path is the same everywhere
        cases = write_inputs(Path("in"))
        for name, (user_file, exclusions) in cases.items():
            print(name, digests(Path(name), name, user_file, exclusions))
    sys.exit(0)
