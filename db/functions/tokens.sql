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

-- What a user may still spend or reserve: balance - pending_out +
-- overdraft_limit, which can pass int64 (a limit near its maximum): it is
-- then int64's maximum, a bound no amount can pass.
CREATE OR REPLACE FUNCTION token_available(p_balance bigint, p_pending_out bigint, p_overdraft_limit bigint)
RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT least(p_balance::numeric - p_pending_out + p_overdraft_limit, 9223372036854775807)::bigint
$$;

-- Moves one user's balance and appends the ledger row that says so, with the
-- user's balance, pending_in and pending_out right after it. The caller holds
-- the user's balance row lock and has checked the move.
CREATE OR REPLACE FUNCTION append_ledger_row(
    p_user_id text, p_kind token_kind, p_amount bigint, p_balance_delta bigint, p_pending_in_delta bigint,
    p_pending_out_delta bigint, p_transaction_id uuid, p_reason text, p_reference_id text, p_counterparty text,
    p_request_id text, p_pending_transfer_id text, p_moved_at timestamptz)
RETURNS TABLE (transaction_id uuid, user_id text, kind token_kind, amount bigint, balance_after bigint,
               pending_in_after bigint, pending_out_after bigint, available_after bigint,
               overdraft_limit bigint, closed boolean, reason text,
               reference_id text, counterparty_user_id text, request_id text, sequence bigint,
               create_time timestamptz, pending_transfer_id text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    moved balances;
BEGIN
    UPDATE balances b SET balance = b.balance + p_balance_delta, pending_in = b.pending_in + p_pending_in_delta,
                          pending_out = b.pending_out + p_pending_out_delta, last_sequence = b.last_sequence + 1,
                          update_time = p_moved_at
    WHERE b.user_id = p_user_id RETURNING b.* INTO moved;
    RETURN QUERY
    INSERT INTO token_transactions AS t (transaction_id, user_id, kind, amount, balance_after, pending_in_after,
                                         pending_out_after, reason, reference_id, counterparty_user_id, request_id,
                                         sequence, pending_transfer_id)
    VALUES (p_transaction_id, p_user_id, p_kind, p_amount, moved.balance, moved.pending_in, moved.pending_out,
            p_reason, p_reference_id, p_counterparty, p_request_id, moved.last_sequence, p_pending_transfer_id)
    RETURNING t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after, t.pending_in_after,
              t.pending_out_after, token_available(t.balance_after, t.pending_out_after, moved.overdraft_limit),
              moved.overdraft_limit, moved.closed, t.reason,
              t.reference_id, t.counterparty_user_id, t.request_id, t.sequence, t.create_time, t.pending_transfer_id;
END $$;

-- The result row of an item that failed: no ledger row, the error columns.
CREATE OR REPLACE FUNCTION token_operation_failure(p_item integer, p_failure text[])
RETURNS token_operation_result
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_item, NULL::uuid, NULL, NULL::token_kind, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint,
           NULL::bigint, NULL::bigint, NULL::boolean, NULL, NULL, NULL, NULL, NULL::bigint, NULL::timestamptz, NULL::text,
           NULL::pending_transfers, p_failure[1], p_failure[2], p_failure[3]
$$;

-- What a request_id stands for: a retry must carry the same arguments.
CREATE OR REPLACE FUNCTION token_request_fingerprint(
    p_op text, p_counterparty text, p_amount bigint, p_reason text, p_reference_id text, p_pending_id text,
    p_timeout integer)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT md5((jsonb_build_array(p_op, p_counterparty, p_amount, p_reason, p_reference_id)
                || CASE WHEN p_op IN ('credit', 'deduct', 'transfer') THEN '[]'::jsonb
                        ELSE jsonb_build_array(p_pending_id, p_timeout) END)::text)
$$;

-- The fast path of apply_token_operations on one node: a batch of credits,
-- deducts and transfers of which none fails and none is a retry applies in a
-- few statements over the whole batch instead of several per item: each
-- user's movements in item order give its running balance (a window over the
-- batch), the overdraft and overflow rules are checked on it, and then the
-- ledger rows, the balances and the claims are written at once. The rows are
-- those apply_token_operation would return, item by item. A batch that does
-- not qualify (a failure, a retry, a duplicate request_id, a closed account)
-- returns no row and writes nothing: the caller applies it item by item. The
-- caller holds the lock of every balance row the batch touches.
CREATE OR REPLACE FUNCTION apply_token_movements(
    p_user_ids text[], p_ops text[], p_counterparties text[], p_amounts bigint[], p_reasons text[],
    p_reference_ids text[], p_request_ids text[])
RETURNS SETOF token_operation_result
LANGUAGE plpgsql AS $$
DECLARE
    moved_at timestamptz := clock_timestamp();
BEGIN
    IF to_regclass('pg_temp.token_movement_legs') IS NULL THEN
    CREATE TEMP TABLE token_movement_legs (
        item integer, leg integer, user_id text, kind token_kind, amount bigint, delta bigint,
        counterparty_user_id text, reason text, reference_id text, request_id text, initiator text,
        -- numeric: a sum past int64 is a violation, found below, not an error here.
        fingerprint text, transaction_id uuid, balance_after numeric, pending_in_after bigint,
        pending_out_after bigint, overdraft_limit bigint, closed boolean, sequence bigint, violates boolean
    ) ON COMMIT DELETE ROWS;
    END IF;
    DELETE FROM token_movement_legs;  -- left by an earlier call in this transaction
    INSERT INTO token_movement_legs
    WITH items AS (
        SELECT i.item, i.initiator, i.op, i.counterparty, i.amount, i.reason, i.reference_id, i.request_id
        FROM unnest(p_user_ids, p_ops, p_counterparties, p_amounts, p_reasons, p_reference_ids, p_request_ids)
             WITH ORDINALITY AS i (initiator, op, counterparty, amount, reason, reference_id, request_id, item)
    ), legs AS (
        SELECT it.*, l.leg, l.user_id, l.kind, l.delta, l.other
        FROM items it
        CROSS JOIN LATERAL (VALUES
            (1, it.initiator, CASE it.op WHEN 'credit' THEN 'credit' WHEN 'deduct' THEN 'debit'
                                         ELSE 'transfer_out' END::token_kind,
             CASE WHEN it.op = 'credit' THEN it.amount ELSE -it.amount END, it.counterparty),
            (2, it.counterparty, 'transfer_in'::token_kind, it.amount, it.initiator)
        ) AS l (leg, user_id, kind, delta, other)
        WHERE l.leg = 1 OR it.op = 'transfer'
    )
    SELECT r.item, r.leg, r.user_id, r.kind, r.amount, r.delta, r.other, r.reason, r.reference_id, r.request_id,
           r.initiator,
           CASE WHEN r.leg = 1
                THEN token_request_fingerprint(r.op, r.counterparty, r.amount, r.reason, r.reference_id, NULL, NULL)
           END,
           gen_random_uuid(), r.balance_after, r.pending_in, r.pending_out, r.overdraft_limit, r.closed, r.sequence,
           r.closed OR (r.delta < 0 AND r.balance_after - r.pending_out + r.overdraft_limit < 0)
                    OR (r.delta > 0 AND r.balance_after + r.pending_in > 9223372036854775807)
    FROM (SELECT l.*, b.pending_in, b.pending_out, b.overdraft_limit, b.closed,
                 b.balance + sum(l.delta) OVER w AS balance_after, b.last_sequence + row_number() OVER w AS sequence
          FROM legs l JOIN balances b ON b.user_id = l.user_id
          WINDOW w AS (PARTITION BY l.user_id ORDER BY l.item, l.leg)) r;

    IF (SELECT count(*) FROM token_movement_legs WHERE leg = 1) <> cardinality(p_ops)
       OR EXISTS (SELECT FROM token_movement_legs WHERE violates)
       OR EXISTS (SELECT FROM token_movement_legs WHERE leg = 1 GROUP BY initiator, request_id HAVING count(*) > 1)
       OR EXISTS (SELECT FROM token_requests r JOIN token_movement_legs l
                  ON l.leg = 1 AND r.user_id = l.initiator AND r.request_id = l.request_id) THEN
        RETURN;
    END IF;

    INSERT INTO token_requests (user_id, request_id, fingerprint, transaction_ids)
    SELECT first_leg.initiator, first_leg.request_id, first_leg.fingerprint,
           array_agg(l.transaction_id ORDER BY l.leg)
    FROM token_movement_legs first_leg JOIN token_movement_legs l ON l.item = first_leg.item
    WHERE first_leg.leg = 1
    GROUP BY first_leg.item, first_leg.initiator, first_leg.request_id, first_leg.fingerprint;
    UPDATE balances b SET balance = m.balance_after, last_sequence = m.sequence, update_time = moved_at
    FROM (SELECT DISTINCT ON (l.user_id) l.user_id, l.balance_after, l.sequence FROM token_movement_legs l
          ORDER BY l.user_id, l.item DESC, l.leg DESC) m
    WHERE b.user_id = m.user_id;
    RETURN QUERY
    WITH inserted AS (
        INSERT INTO token_transactions AS t (transaction_id, user_id, kind, amount, balance_after, pending_in_after,
                                             pending_out_after, reason, reference_id, counterparty_user_id,
                                             request_id, sequence)
        SELECT l.transaction_id, l.user_id, l.kind, l.amount, l.balance_after, l.pending_in_after,
               l.pending_out_after, l.reason, l.reference_id, l.counterparty_user_id, l.request_id, l.sequence
        FROM token_movement_legs l
        RETURNING t.transaction_id, t.create_time
    )
    SELECT l.item, l.transaction_id, l.user_id, l.kind, l.amount, l.balance_after::bigint, l.pending_in_after,
           l.pending_out_after, token_available(l.balance_after::bigint, l.pending_out_after, l.overdraft_limit),
           l.overdraft_limit,
           l.closed, l.reason, l.reference_id, l.counterparty_user_id, l.request_id, l.sequence, i.create_time,
           NULL::text, NULL::pending_transfers, NULL, NULL, NULL
    FROM token_movement_legs l JOIN inserted i ON i.transaction_id = l.transaction_id
    ORDER BY l.item, l.leg;
END $$;

-- One operation of apply_token_operations (see there), item p_item of its
-- batch: its result rows. The caller holds the balance row locks of the
-- users it touches.
CREATE OR REPLACE FUNCTION apply_token_operation(
    p_item integer, p_user_id text, p_op text, p_counterparty text, p_amount bigint, p_reason text,
    p_reference_id text, p_request_id text, p_pending_id text, p_timeout integer)
RETURNS SETOF token_operation_result
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    ids          uuid[];
    earlier      token_requests;
    fingerprint  text;
    initiator    text;
    payer        text;
    payee        text;
    payer_row    balances;
    payee_row    balances;
    pend         pending_transfers;
    moved        bigint;
    -- Citus refuses a volatile function in an UPDATE of a distributed table:
    -- the time is taken into a variable instead.
    moved_at     timestamptz;
    -- The failure: SQLSTATE, message, detail.
    failure      text[];
    failure_code    text;
    failure_message text;
    failure_detail  text;
BEGIN
        pend := NULL;
    IF p_op IN ('post_pending', 'void_pending', 'expire_pending') THEN
        SELECT * INTO pend FROM pending_transfers p WHERE p.pending_transfer_id = p_pending_id FOR UPDATE;
        IF NOT FOUND OR (p_user_id IS NOT NULL AND p_user_id <> pend.from_user_id) THEN
            failure := CASE WHEN pend.pending_transfer_id IS NULL
                THEN ARRAY['NX404', format('pending transfer %s not found', p_pending_id), 'pending_transfer_id']
                ELSE ARRAY['NX403', format('only %s or a service may resolve pending transfer %s',
                                           pend.from_user_id, p_pending_id), 'pending_transfer_id'] END;
            RETURN QUERY SELECT * FROM token_operation_failure(p_item, failure);
            RETURN;
        END IF;
        IF p_op = 'expire_pending' AND (pend.status <> 'pending' OR pend.expire_time > clock_timestamp()) THEN
            RETURN;  -- resolved meanwhile, or not due: nothing to expire
        END IF;
        initiator := pend.from_user_id;
        payer := pend.from_user_id;
        payee := pend.to_user_id;
    ELSE
        initiator := p_user_id;
        payer := CASE WHEN p_op = 'credit' THEN NULL ELSE initiator END;
        payee := CASE WHEN p_op = 'deduct' THEN NULL WHEN p_op = 'credit' THEN initiator ELSE p_counterparty END;
    END IF;
    ids := CASE WHEN payer IS NULL OR payee IS NULL THEN ARRAY[gen_random_uuid()]
                ELSE ARRAY[gen_random_uuid(), gen_random_uuid()] END;

    IF p_op <> 'expire_pending' THEN
        fingerprint := token_request_fingerprint(p_op, p_counterparty, p_amount, p_reason, p_reference_id,
                                                 p_pending_id, p_timeout);
        INSERT INTO token_requests AS r (user_id, request_id, fingerprint, transaction_ids)
        VALUES (initiator, p_request_id, fingerprint, ids)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO earlier FROM token_requests r
            WHERE r.user_id = initiator AND r.request_id = p_request_id;
            IF earlier.fingerprint <> fingerprint OR earlier.error_code IS NOT NULL THEN
                failure := CASE WHEN earlier.fingerprint <> fingerprint
                    THEN ARRAY['NX409', format('request_id %s was already used with different arguments',
                                               p_request_id), 'request_id']
                    ELSE ARRAY[earlier.error_code, earlier.error_message, earlier.error_detail] END;
                RETURN QUERY SELECT * FROM token_operation_failure(p_item, failure);
            ELSE
                -- A pending transfer is shown as it is now. (Read on its
                -- own: Citus joins only tables distributed alike.)
                IF pend.pending_transfer_id IS NULL THEN
                    SELECT p.* INTO pend FROM pending_transfers p
                    WHERE p.pending_transfer_id = (SELECT t.pending_transfer_id FROM token_transactions t
                                                   WHERE t.user_id = initiator
                                                     AND t.transaction_id = earlier.transaction_ids[1]);
                END IF;
                -- The rows sit under the payer's and the payee's keys (the
                -- first under the initiator's).
                RETURN QUERY SELECT p_item, t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after,
                                    t.pending_in_after, t.pending_out_after,
                                    token_available(t.balance_after, t.pending_out_after, b.overdraft_limit),
                                    b.overdraft_limit, b.closed,
                                    t.reason, t.reference_id, t.counterparty_user_id, t.request_id, t.sequence,
                                    t.create_time, t.pending_transfer_id, pend, NULL, NULL, NULL
                             FROM token_transactions t
                             JOIN balances b ON b.user_id = t.user_id
                             WHERE t.user_id IN (payer, payee)
                               AND t.transaction_id = ANY (earlier.transaction_ids)
                             ORDER BY array_position(earlier.transaction_ids, t.transaction_id);
            END IF;
            RETURN;
        END IF;
    END IF;

    SELECT * INTO payer_row FROM balances b WHERE b.user_id = payer;
    SELECT * INTO payee_row FROM balances b WHERE b.user_id = payee;
    moved := CASE WHEN p_op IN ('void_pending', 'expire_pending') OR (p_op = 'post_pending' AND p_amount = 0)
                  THEN pend.amount ELSE p_amount END;
    failure := CASE
        WHEN pend.status = 'expired'
             OR (p_op <> 'expire_pending' AND pend.status = 'pending' AND pend.expire_time <= clock_timestamp()) THEN
            ARRAY['NX412', format('pending transfer %s has expired', pend.pending_transfer_id),
                  'PENDING_TRANSFER_EXPIRED']
        WHEN pend.status <> 'pending' THEN
            ARRAY['NX412', format('pending transfer %s is already %s', pend.pending_transfer_id, pend.status),
                  'PENDING_TRANSFER_RESOLVED']
        WHEN p_op = 'post_pending' AND moved > pend.amount THEN
            ARRAY['NX400', format('cannot post %s of the %s reserved', moved, pend.amount), 'amount']
        WHEN pend.pending_transfer_id IS NOT NULL THEN NULL  -- resolving needs no funds: they are reserved
        WHEN payer_row.closed OR payee_row.closed THEN
            ARRAY['NX412', format('the account of %s is closed',
                                  CASE WHEN payer_row.closed THEN payer ELSE payee END), 'ACCOUNT_CLOSED']
        WHEN payer IS NOT NULL
             AND payer_row.balance::numeric - payer_row.pending_out + payer_row.overdraft_limit < moved THEN
            ARRAY['NX412', format('%s has fewer than %s tokens available', payer, moved), 'INSUFFICIENT_FUNDS']
        WHEN p_op = 'create_pending' AND payer_row.pending_out::numeric + moved > 9223372036854775807 THEN
            ARRAY['NX412', format('the reservations of %s would overflow', payer), 'BALANCE_OVERFLOW']
        WHEN payee IS NOT NULL
             AND payee_row.balance::numeric + payee_row.pending_in + moved > 9223372036854775807 THEN
            ARRAY['NX412', format('the balance of %s would overflow', payee), 'BALANCE_OVERFLOW']
    END;
    IF failure IS NOT NULL THEN
        IF p_op <> 'expire_pending' THEN
            -- Through scalars: an array element in the SET list of an
            -- UPDATE of a distributed table crashes the Citus 14.0.1
            -- backend that runs it (signal 11).
            failure_code := failure[1];
            failure_message := failure[2];
            failure_detail := failure[3];
            UPDATE token_requests r SET transaction_ids = '{}', error_code = failure_code,
                                        error_message = failure_message, error_detail = failure_detail
            WHERE r.user_id = initiator AND r.request_id = p_request_id;
        END IF;
        RETURN QUERY SELECT * FROM token_operation_failure(p_item, failure);
        RETURN;
    END IF;

    moved_at := clock_timestamp();
    IF p_op = 'create_pending' THEN
        INSERT INTO pending_transfers AS p (pending_transfer_id, from_user_id, to_user_id, amount, reason,
                                            reference_id, request_id, expire_time, create_time)
        VALUES (gen_random_uuid()::text, payer, payee, moved, p_reason, p_reference_id, p_request_id,
                CASE WHEN p_timeout > 0 THEN moved_at + make_interval(secs => p_timeout) END, moved_at)
        RETURNING p.* INTO pend;
    ELSIF pend.pending_transfer_id IS NOT NULL THEN
        UPDATE pending_transfers p
        SET status = CASE p_op WHEN 'post_pending' THEN 'posted' WHEN 'void_pending' THEN 'voided'
                             ELSE 'expired' END::pending_transfer_status,
            posted_amount = CASE WHEN p_op = 'post_pending' THEN moved ELSE 0 END,
            resolve_time = moved_at
        WHERE p.pending_transfer_id = pend.pending_transfer_id
        RETURNING p.* INTO pend;
    END IF;

    IF payer IS NOT NULL THEN
        RETURN QUERY
        SELECT p_item, l.*, pend, NULL, NULL, NULL
        FROM append_ledger_row(
            payer,
            CASE p_op WHEN 'deduct' THEN 'debit' WHEN 'transfer' THEN 'transfer_out' WHEN 'post_pending' THEN 'transfer_out'
                    WHEN 'create_pending' THEN 'pending_out' WHEN 'void_pending' THEN 'pending_voided'
                    ELSE 'pending_expired' END::token_kind,
            moved,
            CASE WHEN p_op IN ('deduct', 'transfer', 'post_pending') THEN -moved ELSE 0 END,
            0,
            CASE p_op WHEN 'create_pending' THEN moved WHEN 'deduct' THEN 0 WHEN 'transfer' THEN 0
                    ELSE -pend.amount END,
            ids[1], coalesce(p_reason, pend.reason), coalesce(p_reference_id, pend.reference_id), payee,
            coalesce(p_request_id, pend.request_id), pend.pending_transfer_id, moved_at) l;
    END IF;
    IF payee IS NOT NULL THEN
        RETURN QUERY
        SELECT p_item, l.*, pend, NULL, NULL, NULL
        FROM append_ledger_row(
            payee,
            CASE p_op WHEN 'credit' THEN 'credit' WHEN 'transfer' THEN 'transfer_in' WHEN 'post_pending' THEN 'transfer_in'
                    WHEN 'create_pending' THEN 'pending_in' WHEN 'void_pending' THEN 'pending_voided'
                    ELSE 'pending_expired' END::token_kind,
            moved,
            CASE WHEN p_op IN ('credit', 'transfer', 'post_pending') THEN moved ELSE 0 END,
            CASE p_op WHEN 'create_pending' THEN moved WHEN 'credit' THEN 0 WHEN 'transfer' THEN 0
                    ELSE -pend.amount END,
            0,
            ids[cardinality(ids)], coalesce(p_reason, pend.reason),
            coalesce(p_reference_id, pend.reference_id), payer,
            coalesce(p_request_id, pend.request_id), pend.pending_transfer_id, moved_at) l;
    END IF;
END $$;

-- Applies ledger operations in order. Item i is p_ops[i]:
--   'credit'          p_user_ids[i] is credited;
--   'deduct'          p_user_ids[i] pays;
--   'transfer'        p_user_ids[i] pays p_counterparties[i];
--   'create_pending'  p_amounts[i] is reserved from p_user_ids[i] towards
--                     p_counterparties[i], expiring after p_timeouts[i]
--                     seconds (0: never);
--   'post_pending'    pending transfer p_pending_ids[i] moves p_amounts[i]
--                     (0: all of it) and releases the rest;
--   'void_pending'    pending transfer p_pending_ids[i] is released;
--   'expire_pending'  the same, by the expiry sweep, if it is due.
-- (p_pending_ids and p_timeouts may be left out of a batch that has none.)
-- For post and void, p_user_ids[i] is the acting user (NULL for a service):
-- only the payer and services resolve a pending transfer. The service
-- coalesces concurrent calls into one batch (group commit): on one node a
-- batch of many users, on Citus a batch of one route key, p_route_user_id,
-- delegated to the worker that owns it (on one node p_route_user_id means
-- nothing). A batch of one is the plain call. SubmitOperations sends its
-- operations as one batch, with p_linked: a chain (an item whose p_linked is
-- true, and those after it up to the first that is not) applies all or none;
-- when one of its items fails, it reports its own failure and every other
-- item of the chain NX412 LINKED_OPERATION_FAILED, and nothing of the chain
-- is written (not even a refusal to keep for a retry).
--
-- One or more rows per item, tagged with its position: its ledger rows (the
-- payer's, then the payee's), each with the resulting balances and the
-- pending transfer it concerns; or one row with the item's failure in the
-- error columns and no ledger row: NX412 with the precondition type in
-- error_detail (INSUFFICIENT_FUNDS, BALANCE_OVERFLOW, ACCOUNT_CLOSED,
-- PENDING_TRANSFER_RESOLVED, PENDING_TRANSFER_EXPIRED), NX400 (a post of more
-- than is reserved), NX404 (no such pending transfer), NX403 (not the
-- payer's), NX409 (the request_id was used with other arguments).
--
-- available = balance - pending_out + overdraft_limit is what a payer may
-- spend or reserve; balance + pending_in never passes int64, so a post cannot
-- overflow. A closed account takes no debit, credit or reservation; its
-- pending transfers still resolve.
--
-- Idempotency: each item claims (payer or credited user, request_id) before
-- it checks anything (for post and void: the pending transfer's payer); a
-- retry finds the claim and gets the first result: the same ledger rows, or
-- the same failure. A concurrent duplicate in another batch waits on the
-- same balance row lock.
--
-- Deadlock freedom: every balance row the batch touches (those of the
-- pending transfers it resolves included) is locked up front, one statement
-- per row, in user_id order (rows of new users are created at 0 for that and
-- removed again at the end if nothing moved); pending transfer rows are
-- locked after, by one batch at a time (they belong to locked users), so
-- batches lock in one global order on one node and across workers alike.
CREATE OR REPLACE FUNCTION apply_token_operations(
    p_route_user_id text, p_user_ids text[], p_ops text[], p_counterparties text[], p_amounts bigint[],
    p_reasons text[], p_reference_ids text[], p_request_ids text[], p_pending_ids text[] DEFAULT NULL,
    p_timeouts integer[] DEFAULT NULL, p_linked boolean[] DEFAULT NULL)
RETURNS SETOF token_operation_result
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    holder       text;
    holders      text[];
    created      boolean;
    created_rows text[] := '{}';
    first        integer := 1;
    last         integer;
    chain_rows   token_operation_result[];
    item_rows    token_operation_result[];
    broken       token_operation_result;
    on_citus     boolean := EXISTS (SELECT FROM pg_extension WHERE extname = 'citus');
BEGIN
    holders := p_user_ids || p_counterparties;
    -- Only when the batch resolves pending transfers: on Citus a lookup of no
    -- key would read every shard.
    IF cardinality(array_remove(p_pending_ids, NULL)) > 0 THEN
        holders := holders || (SELECT array_agg(p.from_user_id) || array_agg(p.to_user_id) FROM pending_transfers p
                               WHERE p.pending_transfer_id = ANY (array_remove(p_pending_ids, NULL)));
    END IF;
    IF on_citus THEN
        -- One statement per row, by its key: Citus routes each to the row's shard.
        FOR holder IN SELECT DISTINCT u FROM unnest(holders) AS u WHERE u IS NOT NULL ORDER BY u LOOP
            INSERT INTO balances AS b (user_id, balance) VALUES (holder, 0)
            ON CONFLICT (user_id) DO UPDATE SET balance = b.balance
            RETURNING b.xmax = 0 INTO created;
            IF created THEN
                created_rows := created_rows || holder;
            END IF;
        END LOOP;
    ELSE
        -- One statement, which takes the row locks in the order of its rows.
        WITH locked AS (
            INSERT INTO balances AS b (user_id, balance)
            SELECT u, 0 FROM (SELECT DISTINCT u FROM unnest(holders) AS u WHERE u IS NOT NULL ORDER BY u) AS ordered
            ON CONFLICT (user_id) DO UPDATE SET balance = b.balance
            RETURNING b.user_id, b.xmax = 0 AS created
        )
        SELECT coalesce(array_agg(locked.user_id) FILTER (WHERE locked.created), '{}') INTO created_rows FROM locked;
    END IF;

    -- On one node (Citus routes statement by statement: item by item there), a
    -- large batch of movements only, no chain, goes the fast path if it
    -- qualifies. Its fixed cost (a temporary table, several statements over
    -- the batch) is about that of a few dozen items; a small batch (group
    -- commit's under most loads) goes item by item.
    IF NOT on_citus AND cardinality(p_ops) >= 100
       AND p_ops <@ ARRAY['credit', 'deduct', 'transfer'] AND NOT coalesce(true = ANY (p_linked), false) THEN
        RETURN QUERY SELECT * FROM apply_token_movements(
            p_user_ids, p_ops, p_counterparties, p_amounts, p_reasons, p_reference_ids, p_request_ids);
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;

    WHILE first <= cardinality(p_ops) LOOP
        -- An operation alone, or a chain: it and those after it up to the first not linked.
        last := first;
        WHILE coalesce(p_linked[last], false) AND last < cardinality(p_ops) LOOP
            last := last + 1;
        END LOOP;
        IF last = first THEN
            RETURN QUERY SELECT * FROM apply_token_operation(
                first, p_user_ids[first], p_ops[first], p_counterparties[first], p_amounts[first], p_reasons[first],
                p_reference_ids[first], p_request_ids[first], p_pending_ids[first], p_timeouts[first]);
        ELSE
            -- All or none: the chain runs in a subtransaction that its first
            -- failure rolls back (its claims and stored failures too).
            chain_rows := '{}';
            broken := NULL;
            BEGIN
                FOR k IN first .. last LOOP
                    item_rows := ARRAY(SELECT r FROM apply_token_operation(
                        k, p_user_ids[k], p_ops[k], p_counterparties[k], p_amounts[k], p_reasons[k],
                        p_reference_ids[k], p_request_ids[k], p_pending_ids[k], p_timeouts[k]) r);
                    IF item_rows[1].error_code IS NOT NULL THEN
                        broken := item_rows[1];
                        RAISE EXCEPTION 'operation % of a chain failed', k USING ERRCODE = 'NXCHN';
                    END IF;
                    chain_rows := chain_rows || item_rows;
                END LOOP;
            EXCEPTION WHEN SQLSTATE 'NXCHN' THEN
                NULL;  -- rolled back; broken says why
            END;
            IF broken.item IS NULL THEN
                RETURN QUERY SELECT * FROM unnest(chain_rows);
            ELSE
                RETURN QUERY
                SELECT f.* FROM generate_series(first, last) k
                CROSS JOIN LATERAL token_operation_failure(k, CASE WHEN k = broken.item
                    THEN ARRAY[broken.error_code, broken.error_message, broken.error_detail]
                    ELSE ARRAY['NX412', format('operation %s of the chain failed: %s', broken.item,
                                               broken.error_message), 'LINKED_OPERATION_FAILED'] END) f;
            END IF;
        END IF;
        first := last + 1;
    END LOOP;

    -- One statement per row, by its key: Citus routes each to the row's shard
    -- (a DELETE of "user_id = ANY (…)" would go to every balances shard).
    FOREACH holder IN ARRAY created_rows LOOP
        DELETE FROM balances b WHERE b.user_id = holder AND b.last_sequence = 0;
    END LOOP;
END $$;

-- Voids, in expiry order, up to p_limit pending transfers whose expire_time
-- has passed; returns how many. Each expires once: apply_token_operations
-- checks the status under the row's lock, so replicas sweeping at the same
-- time expire each one once between them.
CREATE OR REPLACE FUNCTION expire_pending_transfers(p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    sweep_time timestamptz := clock_timestamp();
    due        text[];
    expired    integer;
BEGIN
    SELECT array_agg(d.pending_transfer_id ORDER BY d.expire_time) INTO due
    FROM (SELECT p.pending_transfer_id, p.expire_time FROM pending_transfers p
          WHERE p.status = 'pending' AND p.expire_time <= sweep_time
          ORDER BY p.expire_time LIMIT p_limit) d;
    IF due IS NULL THEN
        RETURN 0;
    END IF;
    SELECT count(DISTINCT r.item) INTO expired
    FROM apply_token_operations(
        NULL, array_fill(NULL::text, ARRAY[cardinality(due)]),
        array_fill('expire_pending'::text, ARRAY[cardinality(due)]), array_fill(NULL::text, ARRAY[cardinality(due)]),
        array_fill(NULL::bigint, ARRAY[cardinality(due)]), array_fill(NULL::text, ARRAY[cardinality(due)]),
        array_fill(NULL::text, ARRAY[cardinality(due)]), array_fill(NULL::text, ARRAY[cardinality(due)]),
        due, array_fill(NULL::integer, ARRAY[cardinality(due)])) r
    WHERE r.error_code IS NULL;
    RETURN expired;
END $$;

-- Balances in the order asked for; unknown users have 0 (and no
-- update_time). With p_as_of, as they were at that instant (from the ledger:
-- each user's last row at or before it); available then counts today's
-- overdraft limit.
CREATE OR REPLACE FUNCTION get_balances(p_user_ids text[], p_as_of timestamptz)
RETURNS TABLE (user_id text, balance bigint, pending_in bigint, pending_out bigint, available bigint,
               overdraft_limit bigint, closed boolean, update_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    asked text;
BEGIN
    IF p_as_of IS NULL THEN
        RETURN QUERY
        SELECT asked.user_id, coalesce(b.balance, 0), coalesce(b.pending_in, 0), coalesce(b.pending_out, 0),
               coalesce(token_available(b.balance, b.pending_out, b.overdraft_limit), 0),
               coalesce(b.overdraft_limit, 0),
               coalesce(b.closed, false), CASE WHEN b.last_sequence > 0 THEN b.update_time END
        FROM unnest(p_user_ids) WITH ORDINALITY AS asked (user_id, position)
        -- Filtered by key first: on Citus that reads only the asked users' shards.
        LEFT JOIN (SELECT * FROM balances WHERE balances.user_id = ANY (p_user_ids)) b ON b.user_id = asked.user_id
        ORDER BY asked.position;
        RETURN;
    END IF;
    -- One statement per user, by its key: Citus routes each to its shard.
    FOREACH asked IN ARRAY p_user_ids LOOP
        RETURN QUERY
        SELECT asked, coalesce(t.balance_after, 0), coalesce(t.pending_in_after, 0), coalesce(t.pending_out_after, 0),
               token_available(coalesce(t.balance_after, 0), coalesce(t.pending_out_after, 0),
                               coalesce(b.overdraft_limit, 0)),
               coalesce(b.overdraft_limit, 0), coalesce(b.closed, false), t.create_time
        FROM (SELECT 1) one
        LEFT JOIN LATERAL (SELECT * FROM token_transactions tt WHERE tt.user_id = asked AND tt.create_time <= p_as_of
                           ORDER BY tt.create_time DESC, tt.sequence DESC LIMIT 1) t ON true
        LEFT JOIN balances b ON b.user_id = asked;
    END LOOP;
END $$;

-- A user's overdraft limit and whether the account is closed; returns the
-- balance as get_balances does (a user without a balance row gets one at 0).
CREATE OR REPLACE FUNCTION set_account_policy(p_user_id text, p_overdraft_limit bigint, p_closed boolean)
RETURNS TABLE (user_id text, balance bigint, pending_in bigint, pending_out bigint, available bigint,
               overdraft_limit bigint, closed boolean, update_time timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO balances AS b (user_id, balance, overdraft_limit, closed)
    VALUES (p_user_id, 0, p_overdraft_limit, p_closed)
    ON CONFLICT (user_id) DO UPDATE SET overdraft_limit = EXCLUDED.overdraft_limit, closed = EXCLUDED.closed;
    RETURN QUERY SELECT * FROM get_balances(ARRAY[p_user_id], NULL);
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

-- Every balance that differs from its ledger (the sum of its movements),
-- every ledger whose balance_after chain breaks (each row's balance_after must
-- be the previous one plus or minus its amount), and every pending_in and
-- pending_out that differs from the pending transfers still outstanding. With
-- p_fix, balances are set from the ledger and the pending transfers; a broken
-- chain is reported only (the ledger is append-only).
CREATE OR REPLACE FUNCTION reconcile_balances(p_fix boolean)
RETURNS TABLE (user_id text, sequence bigint, counter text, stored bigint, actual bigint)
LANGUAGE plpgsql AS $$
BEGIN
    DROP TABLE IF EXISTS pg_temp.balance_drift;
    CREATE TEMP TABLE balance_drift ON COMMIT DROP AS
    WITH movement AS (
        SELECT t.user_id, t.sequence, t.balance_after,
               CASE WHEN t.kind IN ('credit', 'transfer_in') THEN t.amount
                    WHEN t.kind IN ('debit', 'transfer_out') THEN -t.amount
                    ELSE 0 END AS delta
        FROM token_transactions t
    )
    , ledger AS (
        SELECT m.user_id, sum(m.delta)::bigint AS total,
               (array_agg(m.balance_after ORDER BY m.sequence DESC))[1] AS last_balance_after
        FROM movement m GROUP BY m.user_id
    )
    , chain AS (
        SELECT m.user_id, m.sequence, m.balance_after,
               coalesce(lag(m.balance_after) OVER w, 0) + m.delta AS expected
        FROM movement m
        WINDOW w AS (PARTITION BY m.user_id ORDER BY m.sequence)
    )
    , reserved_out AS (
        SELECT p.from_user_id AS user_id, sum(p.amount)::bigint AS total
        FROM pending_transfers p WHERE p.status = 'pending' GROUP BY p.from_user_id
    )
    , reserved_in AS (
        SELECT p.to_user_id AS user_id, sum(p.amount)::bigint AS total
        FROM pending_transfers p WHERE p.status = 'pending' GROUP BY p.to_user_id
    )
    SELECT coalesce(b.user_id, l.user_id) AS user_id, NULL::bigint AS sequence, 'balance'::text AS counter,
           coalesce(b.balance, 0) AS stored, coalesce(l.total, 0) AS actual
    FROM balances b FULL JOIN ledger l ON l.user_id = b.user_id
    WHERE coalesce(b.balance, 0) <> coalesce(l.total, 0) OR l.last_balance_after <> l.total
    UNION ALL
    SELECT c.user_id, c.sequence, 'balance_after', c.balance_after, c.expected
    FROM chain c WHERE c.balance_after <> c.expected
    UNION ALL
    SELECT coalesce(b.user_id, r.user_id), NULL, 'pending_out', coalesce(b.pending_out, 0), coalesce(r.total, 0)
    FROM balances b FULL JOIN reserved_out r ON r.user_id = b.user_id
    WHERE coalesce(b.pending_out, 0) <> coalesce(r.total, 0)
    UNION ALL
    SELECT coalesce(b.user_id, r.user_id), NULL, 'pending_in', coalesce(b.pending_in, 0), coalesce(r.total, 0)
    FROM balances b FULL JOIN reserved_in r ON r.user_id = b.user_id
    WHERE coalesce(b.pending_in, 0) <> coalesce(r.total, 0);

    IF p_fix THEN
        UPDATE balances b SET balance = d.actual FROM balance_drift d
        WHERE b.user_id = d.user_id AND d.counter = 'balance';
        UPDATE balances b SET pending_out = d.actual FROM balance_drift d
        WHERE b.user_id = d.user_id AND d.counter = 'pending_out';
        UPDATE balances b SET pending_in = d.actual FROM balance_drift d
        WHERE b.user_id = d.user_id AND d.counter = 'pending_in';
    END IF;
    RETURN QUERY SELECT * FROM balance_drift;
END $$;
