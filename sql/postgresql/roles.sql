-- Roles of the PostgreSQL ledger, applied by `entitle db roles` (idempotent) after the schema exists.
-- Three group roles (NOLOGIN); give them to login users with GRANT entitle_analyst TO alice;
--   entitle_writer   the pipeline: reads everything, writes grants, runs, snapshots, attempts, reconciliations
--   entitle_operator repairs by compensating entries: reads everything, inserts voids, nothing else
--   entitle_analyst  reads the analyst views only (grant_ledger, grant_history, campaign_coverage,
--                    reconciliation_runs, reconciliation_breaks, partition_status); no table, no write
-- Views run with their owner's rights, so the analyst needs no right on the tables behind them.
-- Nobody but the owner may UPDATE or DELETE grants or voids (the append-only triggers refuse it anyway).
-- Each statement ends with a line "-- end".
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'entitle_writer') THEN
        CREATE ROLE entitle_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'entitle_operator') THEN
        CREATE ROLE entitle_operator NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'entitle_analyst') THEN
        CREATE ROLE entitle_analyst NOLOGIN;
    END IF;
END
$$
-- end
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM entitle_writer, entitle_operator, entitle_analyst
-- end
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM entitle_writer, entitle_operator, entitle_analyst
-- end
GRANT USAGE ON SCHEMA public TO entitle_writer, entitle_operator, entitle_analyst
-- end
GRANT SELECT ON ALL TABLES IN SCHEMA public TO entitle_writer, entitle_operator
-- end
GRANT INSERT ON grants, grant_voids, campaigns, campaign_items, snapshots, runs, partition_attempts,
    recon_runs, recon_items, recon_partitions, recon_breaks TO entitle_writer
-- end
GRANT UPDATE ON campaigns, campaign_items, snapshots, partition_attempts, recon_breaks TO entitle_writer
-- end
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO entitle_writer
-- end
GRANT INSERT ON grant_voids TO entitle_operator
-- end
GRANT SELECT ON grant_ledger, grant_history, campaign_coverage, reconciliation_runs, reconciliation_breaks,
    partition_status TO entitle_analyst
-- end
-- Delivery to issuers: the writer records the outbox, the answers and the reports (repair resets
-- an issuer_missing grant's answer); analysts read them (query delivery_conflicts).
GRANT INSERT, UPDATE ON delivery_batches, delivery_answers, delivery_partitions, delivery_revocations TO entitle_writer
-- end
GRANT SELECT ON delivery_batches, delivery_answers, delivery_partitions, delivery_revocations TO entitle_analyst
-- end
-- The issuers' rate budgets, shared by every delivering process (schema version 10); operational
-- state, not read by analysts.
GRANT SELECT, INSERT, UPDATE ON issuer_budgets TO entitle_writer
-- end
-- Reconciliations of the pass and merchant cash programs (query program_reconciliations).
GRANT INSERT ON program_recon_runs TO entitle_writer
-- end
GRANT SELECT ON program_recon_runs TO entitle_analyst
-- end
-- First-come-first-served pass: the writer takes application batches in and allocates; analysts read
-- the stock and the outcomes (queries pass_stock, pass_outcomes).
GRANT INSERT, UPDATE ON pass_programs, pass_batches, pass_applications, pass_allocations TO entitle_writer
-- end
GRANT SELECT ON pass_programs, pass_batches, pass_applications, pass_allocations TO entitle_analyst
-- end
-- The campaign catalogue (ids, items and their terms) is not personal data; analysts join it in the
-- program queries. Grants, voids, runs and breaks they read through the views above.
GRANT SELECT ON campaigns, campaign_items TO entitle_analyst
-- end
-- Merchant cash programs: the writer ingests claims and pays; operators (reviewers) record decisions;
-- analysts read the program's tables (queries payouts_per_tier, open_reviews, claims_by_state).
GRANT INSERT ON merchant_claims, merchant_cases, merchant_decisions, merchant_intake_files TO entitle_writer
-- end
GRANT UPDATE ON merchant_cases TO entitle_writer, entitle_operator
-- end
GRANT INSERT ON merchant_decisions TO entitle_operator
-- end
GRANT SELECT ON merchant_claims, merchant_cases, merchant_decisions, merchant_intake_files TO entitle_analyst
-- end
DO $$
BEGIN
    -- The grant step stages each partition in temporary tables.
    EXECUTE format('GRANT TEMPORARY, CONNECT ON DATABASE %I TO entitle_writer', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO entitle_operator, entitle_analyst', current_database());
END
$$
-- end
