"""The drawer_pass DAG, run for real through ``dag.test`` on a project-local Airflow (see test_dags.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from support.cli import run_dag
from support.drawer_pass import program_text, serving_order, synthetic, write_applications

APPLICATIONS, CAP = 2_000, 500

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


def test_dag_stores_batches_allocates_in_order_and_reruns_change_nothing(
    airflow_env: dict[str, str],
    tmp_path: Path,
) -> None:
    env = dict(airflow_env)
    home = tmp_path / "var"
    program = tmp_path / "program.toml"
    program.write_text(program_text(CAP), encoding="utf-8")
    env.update({"ENTITLE_HOME": str(home), "ENTITLE_PASS_PROGRAM": str(program)})
    rows = synthetic(APPLICATIONS, seed=11)
    incoming = home / "incoming" / "pass" / "drawer-pass-test"
    write_applications(incoming / "batch-a.parquet", rows[: APPLICATIONS // 2])
    write_applications(incoming / "batch-b.csv", [(u, a.isoformat()) for u, a in rows[APPLICATIONS // 2 :]])

    code, result, log = run_dag(env, dag_id="drawer_pass")
    assert code == 0 and result["state"] == "success", log
    engine = sa.create_engine(f"sqlite:///{home / 'ledger.sqlite'}")
    try:
        with engine.connect() as connection:
            granted = {int(u) for u in connection.execute(sa.text("SELECT user_id FROM grants")).scalars()}
        assert granted == set(serving_order(rows)[:CAP])
        reminders = list((home / "campaigns" / "drawer-pass-test" / "notices" / "reminders").glob("*/pass.parquet"))
        assert len(reminders) == 1

        code, result, log = run_dag(env, dag_id="drawer_pass")
        assert code == 0 and result["state"] == "success", log
        with engine.connect() as connection:
            counts = connection.execute(
                sa.text("SELECT (SELECT count(*) FROM grants), (SELECT count(*) FROM pass_batches)")
            ).one()
        assert tuple(counts) == (CAP, 2)

        for path in incoming.iterdir():  # an hour with no batch at all still allocates and reconciles
            path.unlink()
        code, result, log = run_dag(env, dag_id="drawer_pass")
        assert code == 0 and result["state"] == "success", log
    finally:
        engine.dispose()
