-- Pending (two-phase) transfers and account policy.
--
-- A balance row also carries what is reserved from the user (pending_out)
-- and towards the user (pending_in), the overdraft limit the balance may go
-- below zero by, and whether the account is closed. available = balance -
-- pending_out + overdraft_limit is what the user may still spend; the
-- functions check it (a constraint cannot: lowering a limit below a debt is
-- allowed, it only stops further spending).
ALTER TABLE balances DROP CONSTRAINT balances_balance_check;
ALTER TABLE balances
    ADD COLUMN pending_in bigint NOT NULL DEFAULT 0 CHECK (pending_in >= 0),
    ADD COLUMN pending_out bigint NOT NULL DEFAULT 0 CHECK (pending_out >= 0),
    ADD COLUMN overdraft_limit bigint NOT NULL DEFAULT 0 CHECK (overdraft_limit >= 0),
    ADD COLUMN closed boolean NOT NULL DEFAULT false;

-- A reservation, its release on a void or an expiry, and a post are ledger
-- rows too: every row records the user's balance, pending_in and pending_out
-- right after it, so the ledger answers "what was it at instant t".
ALTER TYPE token_kind ADD VALUE 'pending_out';
ALTER TYPE token_kind ADD VALUE 'pending_in';
ALTER TYPE token_kind ADD VALUE 'pending_voided';
ALTER TYPE token_kind ADD VALUE 'pending_expired';
ALTER TABLE token_transactions DROP CONSTRAINT token_transactions_balance_after_check;
ALTER TABLE token_transactions DROP CONSTRAINT token_transactions_check;
ALTER TABLE token_transactions
    ADD COLUMN pending_in_after bigint NOT NULL DEFAULT 0,
    ADD COLUMN pending_out_after bigint NOT NULL DEFAULT 0,
    ADD COLUMN pending_transfer_id text,
    ADD CONSTRAINT token_transactions_counterparty_check
        CHECK ((kind NOT IN ('credit', 'debit')) = (counterparty_user_id IS NOT NULL));
CREATE INDEX token_transactions_user_id_create_time_idx ON token_transactions (user_id, create_time);

-- A request that failed keeps its failure: a retry gets the same error, not a
-- second attempt that might succeed after the caller saw it fail.
ALTER TABLE token_requests
    ADD COLUMN error_code text,
    ADD COLUMN error_message text,
    ADD COLUMN error_detail text;

CREATE TYPE pending_transfer_status AS ENUM ('pending', 'posted', 'voided', 'expired');

-- pending_transfer_id is a UUID kept as text: on Citus the table is
-- distributed by it alongside the users' tables (hashed as text, as user ids
-- are), so a call routed by the id alone runs on the worker that holds it.
CREATE TABLE pending_transfers (
    pending_transfer_id text NOT NULL PRIMARY KEY,
    from_user_id        text NOT NULL,
    to_user_id          text NOT NULL CHECK (to_user_id <> from_user_id),
    amount              bigint NOT NULL CHECK (amount > 0),
    posted_amount       bigint NOT NULL DEFAULT 0 CHECK (posted_amount BETWEEN 0 AND amount),
    status              pending_transfer_status NOT NULL DEFAULT 'pending',
    reason              text NOT NULL,
    reference_id        text NOT NULL,
    request_id          text NOT NULL,
    expire_time         timestamptz,
    create_time         timestamptz NOT NULL DEFAULT clock_timestamp(),
    resolve_time        timestamptz,
    CHECK ((status = 'pending') = (resolve_time IS NULL))
);
-- The expiry sweep reads the outstanding ones by expiry, soonest first.
CREATE INDEX pending_transfers_due_idx ON pending_transfers (expire_time)
    WHERE status = 'pending' AND expire_time IS NOT NULL;
-- reconcile_balances sums what is reserved per payer and per payee.
CREATE INDEX pending_transfers_from_user_id_idx ON pending_transfers (from_user_id) WHERE status = 'pending';
CREATE INDEX pending_transfers_to_user_id_idx ON pending_transfers (to_user_id) WHERE status = 'pending';

-- What apply_token_operations returns per ledger row (or per failed item).
CREATE TYPE token_operation_result AS (
    item                 integer,
    transaction_id       uuid,
    user_id              text,
    kind                 token_kind,
    amount               bigint,
    balance_after        bigint,
    pending_in_after     bigint,
    pending_out_after    bigint,
    available_after      bigint,
    overdraft_limit      bigint,
    closed               boolean,
    reason               text,
    reference_id         text,
    counterparty_user_id text,
    request_id           text,
    sequence             bigint,
    create_time          timestamptz,
    pending_transfer_id  text,
    pending              pending_transfers,
    error_code           text,
    error_message        text,
    error_detail         text
);

DROP FUNCTION IF EXISTS apply_token_operations(text, text[], text[], text[], bigint[], text[], text[], text[]);
DROP FUNCTION IF EXISTS get_balances(text[]);
