-- What operators read: effects listed and counted (relay list, stats), one effect's story.

-- name: list_effects
-- A PENDING effect of a group that waits behind a REJECTED, UNKNOWN or STUCK one (the latest of
-- its group, not released) is listed as PARKED, with the effect it waits for. Another one
-- waiting behind its group's head names the effect just before it, and that effect's due time
-- when it is not due yet (a head scheduled far ahead holds its group back as surely). Intents
-- published in a batch that needs nothing more (no effect row) are PUBLISHED: the oldest
-- batches, at most as many as effects are asked for, each holding one at least. Intents without
-- an effect row yet are listed too, as `relay stats` counts them: not read yet (PENDING) and
-- claimed in a batch (DISPATCHING).
SELECT l.operation_key, l.effect_type, l.state, l.attempts, l.updated_at, l.reason,
       l.ordering_group
FROM (
    SELECT e.id, e.operation_key, e.effect_type,
           CASE WHEN b.operation_key IS NOT NULL THEN 'PARKED' ELSE e.state END AS state,
           e.attempts, e.updated_at,
           CASE WHEN b.operation_key IS NOT NULL
                THEN format('parked behind %%s (%%s) in group %%s', b.operation_key, b.state,
                            e.ordering_group)
                WHEN w.operation_key IS NOT NULL
                THEN format('waits behind %%s (%%s%%s) in group %%s', w.operation_key, w.state,
                            CASE WHEN w.state = 'PENDING' AND w.available_at > now()
                                 THEN ', due ' || to_char(w.available_at AT TIME ZONE 'UTC',
                                                          'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                                 ELSE '' END,
                            e.ordering_group)
                ELSE e.reason END AS reason,
           e.ordering_group
    FROM relay.effect e
    LEFT JOIN LATERAL (
        SELECT p.operation_key, p.state FROM relay.effect p
        WHERE e.state = 'PENDING' AND e.ordering_group IS NOT NULL
          AND p.ordering_group = e.ordering_group AND p.id < e.id AND p.group_released_at IS NULL
          AND p.state IN ('REJECTED', 'UNKNOWN', 'STUCK')
        ORDER BY p.id DESC LIMIT 1
    ) b ON true
    LEFT JOIN LATERAL (
        SELECT p.operation_key, p.state, p.available_at FROM relay.effect p
        WHERE e.state = 'PENDING' AND e.behind_head AND e.ordering_group IS NOT NULL
          AND p.ordering_group = e.ordering_group AND p.id < e.id AND p.state <> 'CANCELLED'
        ORDER BY p.id DESC LIMIT 1
    ) w ON true
    WHERE (%(state)s::text IS NULL OR e.state = %(state)s
           OR (%(state)s = 'PARKED' AND e.state = 'PENDING' AND e.ordering_group IS NOT NULL))
      AND (%(state)s::text IS DISTINCT FROM 'PARKED' OR b.operation_key IS NOT NULL)
      AND (%(effect_type)s::text IS NULL OR e.effect_type = %(effect_type)s)
      AND (%(group)s::text IS NULL OR e.ordering_group = %(group)s)
      AND (%(older_than_s)s::float8 IS NULL
           OR e.updated_at <= now() - make_interval(secs => %(older_than_s)s))
    UNION ALL
    SELECT x.id, i.operation_key, p.effect_type, 'PUBLISHED', 1, p.published_at, NULL, NULL
    FROM (
        SELECT q.ids, q.effect_type, q.published_at FROM relay.published_batch q
        WHERE (%(state)s::text IS NULL OR %(state)s = 'PUBLISHED')
          AND %(group)s::text IS NULL
          AND (%(effect_type)s::text IS NULL OR q.effect_type = %(effect_type)s)
          AND (%(older_than_s)s::float8 IS NULL
               OR q.published_at <= now() - make_interval(secs => %(older_than_s)s))
        ORDER BY q.published_at, q.id
        LIMIT %(limit)s
    ) p
    CROSS JOIN LATERAL unnest(p.ids) AS x(id)
    JOIN relay.intake i ON i.id = x.id
    UNION ALL
    -- Intents the relay has not read yet (a stopped relay's backlog), PENDING as `relay stats`
    -- counts them: the oldest first, at most as many as effects are asked for.
    SELECT * FROM (
        SELECT u.id, u.operation_key, u.effect_type, 'PENDING', 0, u.enqueued_at, NULL::text,
               i.ordering_group
        FROM relay.intake_unread u
        JOIN relay.intake i ON i.id = u.id
        WHERE (%(state)s::text IS NULL OR %(state)s = 'PENDING')
          AND (%(effect_type)s::text IS NULL OR u.effect_type = %(effect_type)s)
          AND (%(group)s::text IS NULL OR i.ordering_group = %(group)s)
          AND (%(older_than_s)s::float8 IS NULL
               OR u.enqueued_at <= now() - make_interval(secs => %(older_than_s)s))
        ORDER BY u.enqueued_at, u.id
        LIMIT %(limit)s
    ) u
    UNION ALL
    -- Intents claimed in a batch, DISPATCHING until their outcome writes their effect row
    -- (ungrouped: a grouped one has its row from the read).
    SELECT b.id, b.operation_key, b.effect_type, 'DISPATCHING', 1, b.claimed_at, NULL, NULL
    FROM relay.batch_effect b
    WHERE (%(state)s::text IS NULL OR %(state)s = 'DISPATCHING')
      AND %(group)s::text IS NULL
      AND (%(effect_type)s::text IS NULL OR b.effect_type = %(effect_type)s)
      AND (%(older_than_s)s::float8 IS NULL
           OR b.claimed_at <= now() - make_interval(secs => %(older_than_s)s))
) l
ORDER BY l.updated_at, l.id
LIMIT %(limit)s;

-- name: stats
-- PENDING includes the intents the relay has not read from the intake yet (a stopped relay's
-- backlog: relay.intake_unread).
SELECT s.effect_type, s.state, sum(s.n)::bigint AS effects,
       extract(epoch FROM now() - min(s.oldest))::float8 AS oldest_age_s
FROM (
    SELECT effect_type, state, count(*) AS n, min(updated_at) AS oldest
    FROM relay.effect GROUP BY effect_type, state
    UNION ALL
    SELECT u.effect_type, 'PENDING', count(*), min(u.enqueued_at)
    FROM relay.intake_unread u GROUP BY u.effect_type
    UNION ALL
    -- Intents claimed in a batch have no effect row until their outcome is recorded.
    SELECT b.effect_type, 'DISPATCHING', count(*), min(b.claimed_at)
    FROM relay.batch_effect b GROUP BY b.effect_type
    UNION ALL
    -- Published in a batch that needs nothing more: no effect row (relay.published_batch).
    SELECT p.effect_type, 'PUBLISHED', sum(p.n), min(p.published_at)
    FROM relay.published_batch p GROUP BY p.effect_type
) s
GROUP BY s.effect_type, s.state ORDER BY s.effect_type, s.state;

-- name: parked_behind
-- The effect a PENDING effect of a group waits for, if its group is parked (see list_effects).
SELECT p.operation_key, p.state, p.reason FROM relay.effect e, relay.effect p
WHERE e.id = %(effect_id)s AND e.state = 'PENDING' AND e.ordering_group IS NOT NULL
  AND p.ordering_group = e.ordering_group AND p.id < e.id AND p.group_released_at IS NULL
  AND p.state IN ('REJECTED', 'UNKNOWN', 'STUCK')
ORDER BY p.id DESC LIMIT 1;

-- name: get_attempts
-- An attempt's row is written when its outcome is known; one in flight is read off its effect.
SELECT attempt, replica_id, replica_epoch, started_at, ended_at, outcome, reason, partition,
       "offset", verification, verified_at
FROM relay.attempt WHERE effect_id = %(effect_id)s
UNION ALL
SELECT e.attempts, e.owner, e.owner_epoch, e.claimed_at, NULL, NULL, 'in flight', NULL, NULL,
       NULL, NULL
FROM relay.effect e
WHERE e.id = %(effect_id)s AND e.state = 'DISPATCHING' AND e.claimed_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM relay.attempt a
                  WHERE a.effect_id = e.id AND a.attempt = e.attempts)
UNION ALL
-- Published in a batch that needs nothing more: the attempt is the batch's (no rows of its own).
SELECT 1, p.owner, p.owner_epoch, p.claimed_at, p.published_at, 'acked',
       format('acknowledged by Kafka: partition %%s offset %%s', p."partition", p."offset"),
       p."partition", p."offset", NULL, NULL
FROM relay.published_intent(%(effect_id)s) p
WHERE NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = %(effect_id)s)
ORDER BY 1

-- name: get_transitions
-- The log (relay.transition_log: rows and the transitions they imply), with what is implied but
-- not written yet: an effect never claimed shows its enqueue, and a claim in flight shows itself
-- (both are written when the relay records the outcome).
SELECT from_state, to_state, reason, actor, attempt, at FROM (
    SELECT l.transition_id AS id, l.part, l.from_state, l.to_state, l.reason, l.actor,
           l.attempt, l.at
    FROM relay.transition_log l WHERE l.effect_id = %(effect_id)s
    UNION ALL
    SELECT 0, 0, NULL, 'PENDING', 'enqueued', 'application', 0, e.created_at
    FROM relay.effect e
    WHERE e.id = %(effect_id)s
      AND NOT EXISTS (SELECT 1 FROM relay.transition t WHERE t.effect_id = e.id)
    UNION ALL
    SELECT 9223372036854775807, 0, 'PENDING', 'DISPATCHING',
           'claimed for publication (in flight)', e.owner, e.attempts, e.claimed_at
    FROM relay.effect e
    WHERE e.id = %(effect_id)s AND e.state = 'DISPATCHING' AND e.claimed_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM relay.attempt a
                      WHERE a.effect_id = e.id AND a.attempt = e.attempts)
    UNION ALL
    -- Published in a batch that needs nothing more: its story is implied by the batch's row.
    SELECT 0, s.part, s.from_state, s.to_state, s.reason, s.actor, s.attempt, s.at
    FROM relay.published_intent(%(effect_id)s) p
    JOIN relay.intake i ON i.id = %(effect_id)s
    CROSS JOIN LATERAL (VALUES
        (0, NULL, 'PENDING', 'enqueued', 'application', 0, i.enqueued_at),
        (1, 'PENDING', 'DISPATCHING', 'claimed for publication', p.owner, 1, p.claimed_at),
        (2, 'DISPATCHING', 'PUBLISHED',
         format('acknowledged by Kafka: partition %%s offset %%s', p."partition", p."offset"),
         p.owner, 1, p.published_at)) AS s(part, from_state, to_state, reason, actor, attempt, at)
    WHERE NOT EXISTS (SELECT 1 FROM relay.effect e WHERE e.id = %(effect_id)s)
) story ORDER BY id, part
