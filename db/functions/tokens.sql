-- The token ledger: balances that never go negative, an append-only ledger
-- they always equal, atomic transfers, and request_id idempotency.
--
-- Reads are PL/pgSQL, not SQL: a SQL function that cannot be inlined runs its
-- statements with parameters, which Citus cannot plan against a distributed
-- table ("parameterized queries for SQL functions referencing distributed
-- tables are not supported"); PL/pgSQL's parameters it plans, routing a
-- user's read to its shard.

-- The ledger is append-only: no row is changed or removed, so every balance
-- can always be checked against it (reconcile_balances).
CREATE OR REPLACE FUNCTION forbid_ledger_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the token ledger is append-only' USING ERRCODE = 'NX403';
END $$;

CREATE OR REPLACE TRIGGER token_transactions_append_only BEFORE UPDATE OR DELETE ON token_transactions
FOR EACH ROW EXECUTE FUNCTION forbid_ledger_changes();
CREATE OR REPLACE TRIGGER token_transactions_not_truncated BEFORE TRUNCATE ON token_transactions
FOR EACH STATEMENT EXECUTE FUNCTION forbid_ledger_changes();

-- Applies ledger operations in order: item i is initiated by p_user_ids[i],
-- and p_ops[i] is 'credit' (the initiator is credited), 'deduct' (the
-- initiator pays) or 'transfer' (the initiator pays p_counterparties[i]). The
-- service coalesces concurrent calls into one batch (group commit): on one
-- node a batch of many initiators, on Citus a batch of one initiator,
-- p_route_user_id, delegated to the worker that owns the user (on one node
-- p_route_user_id is any item's initiator and means nothing). A batch of one
-- is the plain call.
--
-- One or more rows per item, tagged with its position: its transactions (for
-- a transfer: out, then in); or one row with the item's failure in the error
-- columns and no transaction: NX412 INSUFFICIENT_FUNDS or BALANCE_OVERFLOW
-- (the precondition type in error_detail), NX409 (the request_id was used
-- with other arguments). A failing item writes nothing: it checks before it
-- moves anything and gives its request_id back.
--
-- Idempotency: each item first claims (initiator, request_id); request ids
-- are scoped to the initiating user. A retry finds the claim and gets the
-- original transactions. A concurrent duplicate in another batch waits: both
-- batches lock the initiator's balance row first.
--
-- Deadlock freedom: every balance row the batch touches is locked up front,
-- one statement per row, in user_id order (rows of new users are created at 0
-- for that and removed again at the end if nothing moved), so batches lock in
-- one global order on one node and across workers alike.
CREATE OR REPLACE FUNCTION apply_token_operations(
    p_route_user_id text, p_user_ids text[], p_ops text[], p_counterparties text[], p_amounts bigint[],
    p_reasons text[], p_reference_ids text[], p_request_ids text[])
RETURNS TABLE (item integer, transaction_id uuid, user_id text, kind token_kind, amount bigint,
               balance_after bigint, reason text, reference_id text, counterparty_user_id text,
               request_id text, sequence bigint, create_time timestamptz,
               error_code text, error_message text, error_detail text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    holder       text;
    initiator    text;
    created      boolean;
    created_rows text[] := '{}';
    ids          uuid[];
    earlier      token_requests;
    fingerprint  text;
    payer        text;
    payee        text;
    payer_balance  bigint;
    payer_sequence bigint;
    payee_balance  bigint;
    payee_sequence bigint;
    -- Citus refuses a volatile function in an UPDATE of a distributed table:
    -- the time is taken per item into a variable instead.
    moved_at       timestamptz;
    -- An item's failure: SQLSTATE, message, precondition type.
    failure        text[];
BEGIN
    FOR holder IN SELECT DISTINCT u FROM unnest(p_user_ids || p_counterparties) AS u WHERE u IS NOT NULL ORDER BY u LOOP
        INSERT INTO balances AS b (user_id, balance) VALUES (holder, 0)
        ON CONFLICT (user_id) DO UPDATE SET balance = b.balance
        RETURNING b.xmax = 0 INTO created;
        IF created THEN
            created_rows := created_rows || holder;
        END IF;
    END LOOP;

    FOR i IN 1 .. cardinality(p_ops) LOOP
        initiator := p_user_ids[i];
        payer := CASE WHEN p_ops[i] = 'credit' THEN NULL ELSE initiator END;
        payee := CASE p_ops[i] WHEN 'credit' THEN initiator WHEN 'transfer' THEN p_counterparties[i] END;
        fingerprint := md5(jsonb_build_array(p_ops[i], p_counterparties[i], p_amounts[i], p_reasons[i],
                                             p_reference_ids[i])::text);
        ids := CASE WHEN p_ops[i] = 'transfer' THEN ARRAY[gen_random_uuid(), gen_random_uuid()]
                    ELSE ARRAY[gen_random_uuid()] END;

        INSERT INTO token_requests AS r (user_id, request_id, fingerprint, transaction_ids)
        VALUES (initiator, p_request_ids[i], fingerprint, ids)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO earlier FROM token_requests r
            WHERE r.user_id = initiator AND r.request_id = p_request_ids[i];
            IF earlier.fingerprint <> fingerprint THEN
                RETURN QUERY SELECT i, NULL::uuid, NULL, NULL::token_kind, NULL::bigint, NULL::bigint, NULL, NULL,
                                    NULL, NULL, NULL::bigint, NULL::timestamptz, 'NX409',
                                    format('request_id %s was already used with different arguments', p_request_ids[i]),
                                    'request_id';
            ELSE
                -- The legs sit under the payer's and (a transfer) the payee's keys.
                RETURN QUERY SELECT i, t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after,
                                    t.reason, t.reference_id, t.counterparty_user_id, t.request_id, t.sequence,
                                    t.create_time, NULL, NULL, NULL
                             FROM token_transactions t
                             WHERE t.user_id IN (initiator, p_counterparties[i])
                               AND t.transaction_id = ANY (earlier.transaction_ids)
                             ORDER BY array_position(earlier.transaction_ids, t.transaction_id);
            END IF;
            CONTINUE;
        END IF;

        IF payer IS NOT NULL AND (SELECT b.balance FROM balances b WHERE b.user_id = payer) < p_amounts[i] THEN
            failure := ARRAY['NX412', format('%s has fewer than %s tokens', payer, p_amounts[i]), 'INSUFFICIENT_FUNDS'];
        ELSIF payee IS NOT NULL
              AND (SELECT b.balance FROM balances b WHERE b.user_id = payee) > 9223372036854775807 - p_amounts[i] THEN
            failure := ARRAY['NX412', format('the balance of %s would overflow', payee), 'BALANCE_OVERFLOW'];
        ELSE
            failure := NULL;
        END IF;
        IF failure IS NOT NULL THEN
            DELETE FROM token_requests r WHERE r.user_id = initiator AND r.request_id = p_request_ids[i];
            RETURN QUERY SELECT i, NULL::uuid, NULL, NULL::token_kind, NULL::bigint, NULL::bigint, NULL, NULL, NULL,
                                NULL, NULL::bigint, NULL::timestamptz, failure[1], failure[2], failure[3];
            CONTINUE;
        END IF;

        moved_at := clock_timestamp();
        IF payer IS NOT NULL THEN
            UPDATE balances b SET balance = b.balance - p_amounts[i], last_sequence = b.last_sequence + 1,
                                  update_time = moved_at
            WHERE b.user_id = payer RETURNING b.balance, b.last_sequence INTO payer_balance, payer_sequence;
            RETURN QUERY
            INSERT INTO token_transactions AS t (transaction_id, user_id, kind, amount, balance_after, reason,
                                                 reference_id, counterparty_user_id, request_id, sequence)
            VALUES (ids[1], payer, CASE WHEN p_ops[i] = 'transfer' THEN 'transfer_out' ELSE 'debit' END::token_kind,
                    p_amounts[i], payer_balance, p_reasons[i], p_reference_ids[i], payee, p_request_ids[i],
                    payer_sequence)
            RETURNING i, t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after, t.reason,
                      t.reference_id, t.counterparty_user_id, t.request_id, t.sequence, t.create_time, NULL, NULL, NULL;
        END IF;
        IF payee IS NOT NULL THEN
            UPDATE balances b SET balance = b.balance + p_amounts[i], last_sequence = b.last_sequence + 1,
                                  update_time = moved_at
            WHERE b.user_id = payee RETURNING b.balance, b.last_sequence INTO payee_balance, payee_sequence;
            RETURN QUERY
            INSERT INTO token_transactions AS t (transaction_id, user_id, kind, amount, balance_after, reason,
                                                 reference_id, counterparty_user_id, request_id, sequence)
            VALUES (ids[cardinality(ids)], payee,
                    CASE WHEN p_ops[i] = 'transfer' THEN 'transfer_in' ELSE 'credit' END::token_kind,
                    p_amounts[i], payee_balance, p_reasons[i], p_reference_ids[i], payer, p_request_ids[i],
                    payee_sequence)
            RETURNING i, t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after, t.reason,
                      t.reference_id, t.counterparty_user_id, t.request_id, t.sequence, t.create_time, NULL, NULL, NULL;
        END IF;
    END LOOP;

    -- One statement per row, by its key: Citus routes each to the row's shard
    -- (a DELETE of "user_id = ANY (…)" would go to every balances shard).
    FOREACH holder IN ARRAY created_rows LOOP
        DELETE FROM balances b WHERE b.user_id = holder AND b.last_sequence = 0;
    END LOOP;
END $$;

-- Balances in the order asked for; unknown users have 0 (and no update_time).
CREATE OR REPLACE FUNCTION get_balances(p_user_ids text[])
RETURNS TABLE (user_id text, balance bigint, update_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT asked.user_id, coalesce(b.balance, 0), b.update_time
    FROM unnest(p_user_ids) WITH ORDINALITY AS asked (user_id, position)
    -- Filtered by key first: on Citus that reads only the asked users' shards.
    LEFT JOIN (SELECT * FROM balances WHERE balances.user_id = ANY (p_user_ids)) b ON b.user_id = asked.user_id
    ORDER BY asked.position;
END $$;

-- Newest first (by the user's ledger sequence); keyset after p_after_sequence.
CREATE OR REPLACE FUNCTION list_transactions(p_user_id text, p_after_sequence bigint, p_limit integer)
RETURNS SETOF token_transactions
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM token_transactions t
    WHERE t.user_id = p_user_id AND (p_after_sequence IS NULL OR t.sequence < p_after_sequence)
    ORDER BY t.sequence DESC
    LIMIT p_limit;
END $$;

-- Every balance that differs from its ledger (the sum of its movements), and
-- every ledger whose balance_after chain breaks (each row's balance_after must
-- be the previous one plus or minus its amount). With p_fix, balances are set
-- from the ledger; a broken chain is reported only (the ledger is append-only).
CREATE OR REPLACE FUNCTION reconcile_balances(p_fix boolean)
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
