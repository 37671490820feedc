-- The token ledger: balances that never go negative, an append-only ledger
-- they always equal, atomic transfers, and request_id idempotency.
--
-- Per-item failures come back as a status (see apply_token_operations); the
-- service maps them to FAILED_PRECONDITION + PreconditionFailure(type) and
-- ALREADY_EXISTS.

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
CREATE TRIGGER token_transactions_not_truncated BEFORE TRUNCATE ON token_transactions
FOR EACH STATEMENT EXECUTE FUNCTION forbid_ledger_changes();

-- The transactions of one request, in the order they were written (for a
-- transfer: out, then in).
CREATE FUNCTION request_transactions(p_transaction_ids uuid[]) RETURNS SETOF token_transactions
LANGUAGE sql STABLE AS $$
    SELECT t.* FROM unnest(p_transaction_ids) WITH ORDINALITY AS asked (id, position)
    JOIN token_transactions t ON t.transaction_id = asked.id
    ORDER BY asked.position
$$;

-- Applies ledger operations in order, one or more result rows per item
-- (tagged with its position): p_ops[i] is 'credit', 'deduct' or 'transfer'
-- (p_user_ids[i] pays p_counterparties[i]). The service coalesces concurrent
-- calls into one batch (group commit); a batch of one is the plain call.
--
-- status per item: 'ok' with its transactions (for a transfer: out, then in);
-- or 'insufficient_funds', 'balance_overflow', 'request_conflict' (the
-- request_id was used with other arguments) with no transaction. A failing
-- item writes nothing: it checks before it moves anything and gives its
-- request_id back.
--
-- Idempotency: each item first claims (initiator, request_id); request ids
-- are scoped to the initiating user. A retry finds the claim and gets the
-- original transactions. A concurrent duplicate in another batch waits: both
-- batches lock the initiator's balance row first.
--
-- Deadlock freedom: every balance row the batch touches is locked up front in
-- one statement, in user_id order (rows of new users are created at 0 for
-- that and removed again at the end if nothing moved).
CREATE FUNCTION apply_token_operations(
    p_ops text[], p_user_ids text[], p_counterparties text[], p_amounts bigint[], p_reasons text[],
    p_reference_ids text[], p_request_ids text[])
RETURNS TABLE (item integer, status text, transaction_id uuid, user_id text, kind token_kind, amount bigint,
               balance_after bigint, reason text, reference_id text, counterparty_user_id text,
               request_id text, sequence bigint, create_time timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    created_rows text[];
    ids          uuid[];
    earlier      token_requests;
    fingerprint  text;
    payer        text;
    payee        text;
    payer_balance  bigint;
    payer_sequence bigint;
    payee_balance  bigint;
    payee_sequence bigint;
BEGIN
    WITH locked AS (
        INSERT INTO balances AS b (user_id, balance)
        SELECT DISTINCT u, 0 FROM unnest(p_user_ids || p_counterparties) AS u WHERE u IS NOT NULL ORDER BY u
        ON CONFLICT (user_id) DO UPDATE SET balance = b.balance
        RETURNING b.user_id, b.xmax = 0 AS created)
    SELECT coalesce(array_agg(locked.user_id) FILTER (WHERE locked.created), '{}') INTO created_rows FROM locked;

    FOR i IN 1 .. cardinality(p_ops) LOOP
        payer := CASE WHEN p_ops[i] = 'credit' THEN NULL ELSE p_user_ids[i] END;
        payee := CASE p_ops[i] WHEN 'credit' THEN p_user_ids[i] WHEN 'transfer' THEN p_counterparties[i] END;
        fingerprint := md5(jsonb_build_array(p_ops[i], p_counterparties[i], p_amounts[i], p_reasons[i],
                                             p_reference_ids[i])::text);
        ids := CASE WHEN p_ops[i] = 'transfer' THEN ARRAY[gen_random_uuid(), gen_random_uuid()]
                    ELSE ARRAY[gen_random_uuid()] END;

        INSERT INTO token_requests AS r (user_id, request_id, fingerprint, transaction_ids)
        VALUES (p_user_ids[i], p_request_ids[i], fingerprint, ids)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO earlier FROM token_requests r
            WHERE r.user_id = p_user_ids[i] AND r.request_id = p_request_ids[i];
            IF earlier.fingerprint <> fingerprint THEN
                RETURN QUERY SELECT i, 'request_conflict', NULL::uuid, NULL, NULL::token_kind, NULL::bigint,
                                    NULL::bigint, NULL, NULL, NULL, NULL, NULL::bigint, NULL::timestamptz;
            ELSE
                RETURN QUERY SELECT i, 'ok', t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after,
                                    t.reason, t.reference_id, t.counterparty_user_id, t.request_id, t.sequence,
                                    t.create_time
                             FROM request_transactions(earlier.transaction_ids) t;
            END IF;
            CONTINUE;
        END IF;

        IF payer IS NOT NULL AND (SELECT b.balance FROM balances b WHERE b.user_id = payer) < p_amounts[i] THEN
            status := 'insufficient_funds';
        ELSIF payee IS NOT NULL
              AND (SELECT b.balance FROM balances b WHERE b.user_id = payee) > 9223372036854775807 - p_amounts[i] THEN
            status := 'balance_overflow';
        ELSE
            status := 'ok';
        END IF;
        IF status <> 'ok' THEN
            DELETE FROM token_requests r WHERE r.user_id = p_user_ids[i] AND r.request_id = p_request_ids[i];
            RETURN QUERY SELECT i, status, NULL::uuid, NULL, NULL::token_kind, NULL::bigint, NULL::bigint,
                                NULL, NULL, NULL, NULL, NULL::bigint, NULL::timestamptz;
            CONTINUE;
        END IF;

        IF payer IS NOT NULL THEN
            UPDATE balances b SET balance = b.balance - p_amounts[i], last_sequence = b.last_sequence + 1,
                                  update_time = clock_timestamp()
            WHERE b.user_id = payer RETURNING b.balance, b.last_sequence INTO payer_balance, payer_sequence;
        END IF;
        IF payee IS NOT NULL THEN
            UPDATE balances b SET balance = b.balance + p_amounts[i], last_sequence = b.last_sequence + 1,
                                  update_time = clock_timestamp()
            WHERE b.user_id = payee RETURNING b.balance, b.last_sequence INTO payee_balance, payee_sequence;
        END IF;
        RETURN QUERY
        INSERT INTO token_transactions AS t (transaction_id, user_id, kind, amount, balance_after, reason,
                                             reference_id, counterparty_user_id, request_id, sequence)
        SELECT leg.id, leg.user_id, leg.kind, p_amounts[i], leg.balance_after, p_reasons[i], p_reference_ids[i],
               leg.counterparty, p_request_ids[i], leg.sequence
        FROM (VALUES
            (1, ids[1], payer, CASE WHEN p_ops[i] = 'transfer' THEN 'transfer_out' ELSE 'debit' END::token_kind,
             payer_balance, payer_sequence, payee),
            (2, ids[cardinality(ids)], payee,
             CASE WHEN p_ops[i] = 'transfer' THEN 'transfer_in' ELSE 'credit' END::token_kind,
             payee_balance, payee_sequence, payer)
        ) AS leg (position, id, user_id, kind, balance_after, sequence, counterparty)
        WHERE leg.user_id IS NOT NULL
        ORDER BY leg.position
        RETURNING i, 'ok', t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after, t.reason,
                  t.reference_id, t.counterparty_user_id, t.request_id, t.sequence, t.create_time;
    END LOOP;

    DELETE FROM balances b WHERE b.user_id = ANY (created_rows) AND b.last_sequence = 0;
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
    DROP TABLE IF EXISTS pg_temp.balance_drift;
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
