-- The token ledger: balances that never go negative, an append-only ledger
-- they always equal, atomic transfers, and request_id idempotency.
--
-- NX412 with DETAIL INSUFFICIENT_FUNDS / BALANCE_OVERFLOW is mapped to
-- FAILED_PRECONDITION + PreconditionFailure(type); NX409 to ALREADY_EXISTS.

CREATE TYPE token_kind AS ENUM ('credit', 'debit', 'transfer_in', 'transfer_out');

CREATE TABLE balances (
    user_id       text PRIMARY KEY,
    balance       bigint NOT NULL CHECK (balance >= 0),
    -- The sequence of the user's latest ledger row.
    last_sequence bigint NOT NULL DEFAULT 0,
    update_time   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE token_transactions (
    transaction_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id              text NOT NULL,
    kind                 token_kind NOT NULL,
    amount               bigint NOT NULL CHECK (amount > 0),
    balance_after        bigint NOT NULL CHECK (balance_after >= 0),
    reason               text NOT NULL,
    reference_id         text NOT NULL,
    counterparty_user_id text,
    request_id           text NOT NULL,
    -- Per user, the order movements were applied in (balance_after follows it).
    sequence             bigint NOT NULL,
    create_time          timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (user_id, sequence),
    CHECK ((kind IN ('transfer_in', 'transfer_out')) = (counterparty_user_id IS NOT NULL))
);

-- One row per applied request: (initiator, request_id) -> what it did. A
-- retry finds it and returns the original transactions; a concurrent retry
-- waits on this row's unique key until the first attempt commits.
CREATE TABLE token_requests (
    user_id         text NOT NULL,
    request_id      text NOT NULL,
    fingerprint     text NOT NULL,
    transaction_ids uuid[] NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (user_id, request_id)
);

CREATE FUNCTION forbid_ledger_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the token ledger is append-only' USING ERRCODE = 'NX403';
END $$;

CREATE TRIGGER token_transactions_append_only BEFORE UPDATE OR DELETE ON token_transactions
FOR EACH ROW EXECUTE FUNCTION forbid_ledger_changes();

-- The transactions of one request, in the order they were written (for a
-- transfer: out, then in).
CREATE FUNCTION request_transactions(p_transaction_ids uuid[]) RETURNS SETOF token_transactions
LANGUAGE sql STABLE AS $$
    SELECT t.* FROM unnest(p_transaction_ids) WITH ORDINALITY AS asked (id, position)
    JOIN token_transactions t ON t.transaction_id = asked.id
    ORDER BY asked.position
$$;

-- Claims (p_user_id, p_request_id) for this call, naming the transactions it
-- will write. Returns the transaction ids of an earlier identical request (a
-- retry: the caller returns those), or NULL when this call is the first and
-- must do the work. A concurrent duplicate waits on the key until the first
-- attempt commits (then it is a retry) or rolls back (then it does the work).
-- The same request_id with different arguments is NX409.
CREATE FUNCTION claim_request(p_user_id text, p_request_id text, p_fingerprint text, p_transaction_ids uuid[])
RETURNS uuid[]
LANGUAGE plpgsql AS $$
DECLARE
    earlier token_requests;
BEGIN
    INSERT INTO token_requests (user_id, request_id, fingerprint, transaction_ids)
    VALUES (p_user_id, p_request_id, p_fingerprint, p_transaction_ids)
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO earlier FROM token_requests WHERE user_id = p_user_id AND request_id = p_request_id;
    IF earlier.fingerprint <> p_fingerprint THEN
        RAISE EXCEPTION 'request_id % was already used with different arguments', p_request_id
            USING ERRCODE = 'NX409', COLUMN = 'request_id';
    END IF;
    RETURN earlier.transaction_ids;
END $$;

-- Moves p_delta into p_user_id's balance in one statement (creating the row
-- for a credit), which also takes the row lock; returns the new balance and
-- the sequence number of the ledger row to write. Refuses to go below zero
-- (INSUFFICIENT_FUNDS) or past the int64 range (BALANCE_OVERFLOW).
CREATE FUNCTION move_balance(p_user_id text, p_delta bigint, OUT balance_after bigint, OUT sequence bigint)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_delta > 0 THEN
        INSERT INTO balances AS b (user_id, balance, last_sequence) VALUES (p_user_id, p_delta, 1)
        ON CONFLICT (user_id) DO UPDATE
            SET balance = b.balance + p_delta, last_sequence = b.last_sequence + 1, update_time = clock_timestamp()
            WHERE b.balance <= 9223372036854775807 - p_delta
        RETURNING b.balance, b.last_sequence INTO balance_after, sequence;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the balance of % would overflow', p_user_id
                USING ERRCODE = 'NX412', DETAIL = 'BALANCE_OVERFLOW';
        END IF;
    ELSE
        UPDATE balances AS b
        SET balance = b.balance + p_delta, last_sequence = b.last_sequence + 1, update_time = clock_timestamp()
        WHERE b.user_id = p_user_id AND b.balance + p_delta >= 0
        RETURNING b.balance, b.last_sequence INTO balance_after, sequence;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'insufficient funds: % has less than %', p_user_id, -p_delta
                USING ERRCODE = 'NX412', DETAIL = 'INSUFFICIENT_FUNDS';
        END IF;
    END IF;
END $$;

-- Credit or deduct. Returns the transaction (the original one for a retried
-- request_id).
CREATE FUNCTION credit_or_deduct(p_user_id text, p_amount bigint, p_deduct boolean, p_reason text,
                                 p_reference_id text, p_request_id text)
RETURNS SETOF token_transactions
LANGUAGE plpgsql AS $$
DECLARE
    id      uuid := gen_random_uuid();
    earlier uuid[] := claim_request(p_user_id, p_request_id,
                                    md5(jsonb_build_array(CASE WHEN p_deduct THEN 'deduct' ELSE 'credit' END,
                                                          p_amount, p_reason, p_reference_id)::text),
                                    ARRAY[id]);
    moved   record;
BEGIN
    IF earlier IS NOT NULL THEN
        RETURN QUERY SELECT * FROM request_transactions(earlier);
        RETURN;
    END IF;
    moved := move_balance(p_user_id, CASE WHEN p_deduct THEN -p_amount ELSE p_amount END);
    RETURN QUERY
    INSERT INTO token_transactions (transaction_id, user_id, kind, amount, balance_after, reason, reference_id,
                                    request_id, sequence)
    VALUES (id, p_user_id, CASE WHEN p_deduct THEN 'debit' ELSE 'credit' END::token_kind, p_amount,
            moved.balance_after, p_reason, p_reference_id, p_request_id, moved.sequence)
    RETURNING *;
END $$;

-- Atomic transfer: both legs or neither. The two balance rows are locked in
-- user_id order (whichever leg that is comes first), so transfers in opposite
-- directions cannot deadlock. Returns the out and in transactions (the
-- original ones for a retry).
CREATE FUNCTION transfer(p_from_user_id text, p_to_user_id text, p_amount bigint, p_reason text,
                         p_reference_id text, p_request_id text)
RETURNS SETOF token_transactions
LANGUAGE plpgsql AS $$
DECLARE
    out_id  uuid := gen_random_uuid();
    in_id   uuid := gen_random_uuid();
    earlier uuid[];
    out_leg record;
    in_leg  record;
BEGIN
    IF p_from_user_id = p_to_user_id THEN
        RAISE EXCEPTION 'cannot transfer to oneself' USING ERRCODE = 'NX400', COLUMN = 'to_user_id';
    END IF;
    earlier := claim_request(p_from_user_id, p_request_id,
                             md5(jsonb_build_array('transfer', p_to_user_id, p_amount, p_reason,
                                                   p_reference_id)::text),
                             ARRAY[out_id, in_id]);
    IF earlier IS NOT NULL THEN
        RETURN QUERY SELECT * FROM request_transactions(earlier);
        RETURN;
    END IF;
    IF p_from_user_id < p_to_user_id THEN
        out_leg := move_balance(p_from_user_id, -p_amount);
        in_leg := move_balance(p_to_user_id, p_amount);
    ELSE
        in_leg := move_balance(p_to_user_id, p_amount);
        out_leg := move_balance(p_from_user_id, -p_amount);
    END IF;
    RETURN QUERY
    INSERT INTO token_transactions (transaction_id, user_id, kind, amount, balance_after, reason, reference_id,
                                    counterparty_user_id, request_id, sequence)
    VALUES (out_id, p_from_user_id, 'transfer_out', p_amount, out_leg.balance_after, p_reason, p_reference_id,
            p_to_user_id, p_request_id, out_leg.sequence),
           (in_id, p_to_user_id, 'transfer_in', p_amount, in_leg.balance_after, p_reason, p_reference_id,
            p_from_user_id, p_request_id, in_leg.sequence)
    RETURNING *;
END $$;

-- Balances in the order asked for; unknown users have 0 (and no update_time).
CREATE FUNCTION get_balances(p_user_ids text[])
RETURNS TABLE (user_id text, balance bigint, update_time timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT asked.user_id, coalesce(b.balance, 0), b.update_time
    FROM unnest(p_user_ids) WITH ORDINALITY AS asked (user_id, position)
    LEFT JOIN balances b ON b.user_id = asked.user_id
    ORDER BY asked.position
$$;

-- Newest first (by the user's ledger sequence); keyset after p_after_sequence.
CREATE FUNCTION list_transactions(p_user_id text, p_after_sequence bigint, p_limit integer)
RETURNS SETOF token_transactions
LANGUAGE sql STABLE AS $$
    SELECT * FROM token_transactions t
    WHERE t.user_id = p_user_id AND (p_after_sequence IS NULL OR t.sequence < p_after_sequence)
    ORDER BY t.sequence DESC
    LIMIT p_limit
$$;

-- Every balance that differs from its ledger (the sum of its movements), and
-- every ledger whose balance_after chain breaks (each row's balance_after must
-- be the previous one plus or minus its amount). With p_fix, balances are set
-- from the ledger; a broken chain is reported only (the ledger is append-only).
CREATE FUNCTION reconcile_balances(p_fix boolean)
RETURNS TABLE (user_id text, sequence bigint, counter text, stored bigint, actual bigint)
LANGUAGE plpgsql AS $$
BEGIN
    CREATE TEMP TABLE balance_drift ON COMMIT DROP AS
    WITH ledger AS (
        SELECT t.user_id,
               sum(CASE WHEN t.kind IN ('credit', 'transfer_in') THEN t.amount ELSE -t.amount END)::bigint AS total,
               (array_agg(t.balance_after ORDER BY t.sequence DESC))[1] AS last_balance_after
        FROM token_transactions t GROUP BY t.user_id
    )
    , chain AS (
        SELECT t.user_id, t.sequence, t.balance_after,
               coalesce(lag(t.balance_after) OVER w, 0)
                 + CASE WHEN t.kind IN ('credit', 'transfer_in') THEN t.amount ELSE -t.amount END AS expected
        FROM token_transactions t
        WINDOW w AS (PARTITION BY t.user_id ORDER BY t.sequence)
    )
    SELECT coalesce(b.user_id, l.user_id) AS user_id, NULL::bigint AS sequence, 'balance'::text AS counter,
           coalesce(b.balance, 0) AS stored, coalesce(l.total, 0) AS actual
    FROM balances b FULL JOIN ledger l ON l.user_id = b.user_id
    WHERE coalesce(b.balance, 0) <> coalesce(l.total, 0) OR l.last_balance_after <> l.total
    UNION ALL
    SELECT c.user_id, c.sequence, 'balance_after', c.balance_after, c.expected
    FROM chain c WHERE c.balance_after <> c.expected;

    IF p_fix THEN
        UPDATE balances b SET balance = d.actual FROM balance_drift d
        WHERE b.user_id = d.user_id AND d.counter = 'balance';
    END IF;
    RETURN QUERY SELECT * FROM balance_drift;
END $$;
