-- 0021: an explicit business key must not be one another effect type's template can make
-- (issue 18 item 8b): an application could otherwise give its intent the key of another's effect,
-- and an observer searching the downstream by that key could take either for the other. Refused
-- at enqueue (RL002) on every path, and REJECTED when read from a row written by hand. Templates
-- of distinct types are kept apart by `relay migrate` (relay/business_keys.py). Same signatures:
-- grants are kept.

-- The regular expression of every key a template can make (relay.business_key's rule: its literal
-- text as written, and each field's value with the template's own characters and '%' as %XX).
CREATE FUNCTION relay.business_key_pattern(p_template text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_literal text := regexp_replace(p_template, '\{[A-Za-z0-9_]+\}', '', 'g') || '%';
    v_field   text;
    v_out     text := '^';
    v_part    text[];
BEGIN
    v_field := '(?:[^' || regexp_replace(v_literal, '([^A-Za-z0-9])', '\\\1', 'g')
               || ']|%[0-9A-F]{2})*';
    FOR v_part IN SELECT regexp_matches(p_template, '\{([A-Za-z0-9_]+)\}|([^{]+|\{)', 'g') LOOP
        IF v_part[1] IS NULL THEN
            v_out := v_out || regexp_replace(v_part[2], '([^A-Za-z0-9])', '\\\1', 'g');
        ELSE
            v_out := v_out || v_field;
        END IF;
    END LOOP;
    RETURN v_out || '$';
END
$fn$;

-- Another effect type whose template could make this key (NULL when none): an explicit key must
-- not be one that the relay computes for another type's effects, or an application could give
-- its intent the key of another's effect (an observer searching the downstream by that key would
-- find the wrong one; issue 18 item 8b). `relay migrate` keeps templates of distinct types apart
-- (relay/business_keys.py), so a computed key is never another template's.
CREATE FUNCTION relay.business_key_maker(p_effect_type text, p_key text)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
SELECT min(t.name) FROM relay.effect_type t
WHERE t.business_key IS NOT NULL AND t.name IS DISTINCT FROM p_effect_type
  AND p_key ~ relay.business_key_pattern(t.business_key)
$fn$;

-- The business key an intent is stored with: the type's own when it has a template (an explicit
-- one must equal it: an application must not pick another effect's key, issue 18 item 8b), else
-- the caller's, which no other type's template may be able to make. Raises RL002, as
-- relay.business_key does; the enqueue paths call it (for a type without a template, only when
-- a key is given).
CREATE OR REPLACE FUNCTION relay.checked_business_key(p_template text, p_payload jsonb,
                                           p_operation_key text, p_given text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_key   text;
    v_maker text;
BEGIN
    IF p_template IS NULL THEN
        v_maker := CASE WHEN p_given IS NOT NULL THEN relay.business_key_maker(NULL, p_given) END;
        IF v_maker IS NOT NULL THEN
            RAISE EXCEPTION 'business key of % could be made by the template of effect type %: an explicit key must not be one another type computes',
                p_operation_key, quote_literal(v_maker) USING ERRCODE = 'RL002';
        END IF;
        RETURN p_given;
    END IF;
    v_key := relay.business_key(p_template, p_payload, p_operation_key);
    IF p_given IS NOT NULL AND p_given <> v_key THEN
        RAISE EXCEPTION 'business key of % differs from the one its type computes from the template %: a type with a template takes no other',
            p_operation_key, quote_literal(p_template) USING ERRCODE = 'RL002';
    END IF;
    RETURN v_key;
END
$fn$;

-- The checks the intake does not make, as one expression per row: NULL when the row is fine,
-- else why it is refused. Shared by promote_intake; the same limits relay.enqueue applies.
-- Inlined into the reader's statement (a call cost 7 us a row): no SET clause (it runs with its
-- caller's search_path, and every caller is a function that sets its own), and STABLE, not
-- IMMUTABLE (format() of a time is stable; an IMMUTABLE body with a stable call is not inlined).
CREATE OR REPLACE FUNCTION relay.intake_refusal(
    p_operation_key text, p_effect_type text, p_payload jsonb, p_business_key text,
    p_traceparent text, p_available_at timestamptz, p_ordering_group text, p_topic text,
    p_max_payload_bytes integer
) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
SELECT CASE
    WHEN length(p_operation_key) NOT BETWEEN 1 AND 512
        THEN 'operation key must be 1 to 512 characters'
    WHEN strpos(p_operation_key, '#compensation') > 0
         AND p_operation_key ~ '#compensation(-[0-9]+)?$'
        THEN 'operation key is reserved for the relay''s own compensations'
    WHEN p_topic IS NULL
        THEN format('effect type %s is not declared', quote_literal(p_effect_type))
    WHEN jsonb_typeof(p_payload) <> 'object' THEN 'payload must be a JSON object'
    WHEN jsonb_path_exists(p_payload,
                           'strict $.**{100} ? (@.type() == "object" || @.type() == "array")')
        THEN 'payload nests deeper than 100 levels'
    WHEN pg_column_size(p_payload) * 6 > p_max_payload_bytes
         AND octet_length(p_payload::text) > p_max_payload_bytes
        THEN format('payload is %s bytes of JSON, more than max_payload_bytes (%s)',
                    octet_length(p_payload::text), p_max_payload_bytes)
    WHEN p_business_key IS NOT NULL AND length(p_business_key) NOT BETWEEN 1 AND 512
        THEN 'business key must be 1 to 512 characters'
    WHEN p_business_key IS NOT NULL
         AND relay.business_key_maker(p_effect_type, p_business_key) IS NOT NULL
        THEN format('business key could be made by the template of effect type %s: an explicit key must not be one another type computes',
                    quote_literal(relay.business_key_maker(p_effect_type, p_business_key)))
    WHEN p_available_at IS NOT NULL AND NOT isfinite(p_available_at)
        THEN format('available_at must be a finite time, not %s', p_available_at)
    WHEN p_traceparent IS NOT NULL
         AND p_traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        THEN 'traceparent is not a W3C traceparent'
    WHEN p_ordering_group IS NOT NULL AND length(p_ordering_group) NOT BETWEEN 1 AND 512
        THEN 'ordering group must be 1 to 512 characters'
END
$fn$;
