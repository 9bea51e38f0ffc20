-- The Data API tests' schema: every relationship kind, RLS, functions.
CREATE ROLE web_anon NOLOGIN;
CREATE ROLE web_user NOLOGIN;
CREATE ROLE web_super NOLOGIN SUPERUSER;

CREATE TABLE authors (id serial PRIMARY KEY, name text NOT NULL, country text, born date, meta jsonb);
CREATE TABLE publishers (id serial PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE books (
  id serial PRIMARY KEY, title text NOT NULL, author_id int REFERENCES authors(id),
  publisher_id int REFERENCES publishers(id), year int, price numeric(8,2), labels text[],
  published boolean DEFAULT true,
  search tsvector GENERATED ALWAYS AS (to_tsvector('english', title)) STORED,
  window_years int4range);
CREATE TABLE tags (id serial PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE book_tags (book_id int REFERENCES books(id) ON DELETE CASCADE, tag_id int REFERENCES tags(id),
                        PRIMARY KEY (book_id, tag_id));
CREATE TABLE author_profiles (author_id int PRIMARY KEY REFERENCES authors(id), bio text);
CREATE TABLE employees (id int PRIMARY KEY, name text, manager_id int REFERENCES employees(id));
CREATE TABLE notes (id serial PRIMARY KEY,
                    owner text NOT NULL DEFAULT (current_setting('request.jwt.claims', true)::json->>'sub'),
                    body text);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON notes
  USING (owner = current_setting('request.jwt.claims', true)::json->>'sub')
  WITH CHECK (owner = current_setting('request.jwt.claims', true)::json->>'sub');
CREATE TABLE kv (k text PRIMARY KEY, v int NOT NULL DEFAULT 7, note text);

INSERT INTO authors (name, country, born, meta) VALUES
  ('Ursula K. Le Guin', 'US', '1929-10-21', '{"genre": "sf", "awards": {"hugo": 5}}'),
  ('Stanislaw Lem', 'PL', '1921-09-12', '{"genre": "sf", "awards": {"hugo": 0}}'),
  ('Jane Austen', 'GB', '1775-12-16', '{"genre": "romance"}'),
  ('Anonymous', NULL, NULL, NULL);
INSERT INTO publishers (name) VALUES ('Ace'), ('Penguin');
INSERT INTO books (title, author_id, publisher_id, year, price, labels, window_years) VALUES
  ('The Left Hand of Darkness', 1, 1, 1969, 9.99, '{classic,sf}', '[1960,1970)'),
  ('The Dispossessed', 1, 1, 1974, 12.50, '{sf}', '[1970,1980)'),
  ('Solaris', 2, 2, 1961, 8.00, '{sf,classic}', '[1960,1970)'),
  ('The Cyberiad', 2, NULL, 1965, NULL, '{humor}', '[1960,1970)'),
  ('Pride and Prejudice', 3, 2, 1813, 5.25, '{classic,romance}', '[1810,1820)'),
  ('Emma', 3, 2, 1815, 6.75, NULL, NULL);
INSERT INTO tags (name) VALUES ('favourite'), ('reread'), ('gift');
INSERT INTO book_tags VALUES (1, 1), (1, 2), (3, 1), (5, 3);
INSERT INTO author_profiles VALUES (1, 'Wrote Earthsea'), (2, 'Polish SF');
INSERT INTO employees VALUES (1, 'boss', NULL), (2, 'alice', 1), (3, 'bob', 1);
INSERT INTO notes (owner, body) VALUES ('alice', 'alice 1'), ('alice', 'alice 2'), ('bob', 'bob 1');
INSERT INTO kv (k, v) VALUES ('a', 1), ('b', 2);

CREATE FUNCTION add(a int, b int DEFAULT 10) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT a + b';
CREATE FUNCTION books_after(y int) RETURNS SETOF books LANGUAGE sql STABLE
  AS 'SELECT * FROM books WHERE year > y ORDER BY id';
CREATE FUNCTION author_counts() RETURNS TABLE (author text, n bigint) LANGUAGE sql STABLE
  AS 'SELECT a.name, count(b.id) FROM authors a LEFT JOIN books b ON b.author_id = a.id GROUP BY a.name';
CREATE FUNCTION one_author(aid int) RETURNS authors LANGUAGE sql STABLE AS 'SELECT * FROM authors WHERE id = aid';
CREATE FUNCTION years() RETURNS SETOF int LANGUAGE sql STABLE AS 'SELECT year FROM books ORDER BY year';
CREATE FUNCTION whoami() RETURNS text LANGUAGE sql STABLE
  AS $$ SELECT current_user || ':' || coalesce(current_setting('request.jwt.claims', true)::json->>'sub', '') $$;
CREATE FUNCTION request_info() RETURNS json LANGUAGE sql STABLE AS $$
  SELECT json_build_object('method', current_setting('request.method'), 'path', current_setting('request.path'),
                           'custom', current_setting('request.headers')::json->>'x-custom',
                           'role', current_user) $$;
CREATE FUNCTION teapot() RETURNS void LANGUAGE plpgsql AS $$ BEGIN
  PERFORM set_config('response.status', '418', true);
  PERFORM set_config('response.headers', '[{"X-Tea": "earl grey"}]', true);
END $$;
CREATE FUNCTION bad_headers() RETURNS int LANGUAGE plpgsql VOLATILE AS $$ BEGIN
  INSERT INTO kv (k, v) VALUES ('bad-headers', 1);
  PERFORM set_config('response.headers', '{"not": "an array"}', true);
  RETURN 1;
END $$;
CREATE FUNCTION pay() RETURNS void LANGUAGE plpgsql AS $$ BEGIN
  RAISE sqlstate 'PT402' USING message = 'Payment Required', detail = 'Quota exceeded', hint = 'Upgrade';
END $$;
CREATE FUNCTION add_kv(key text, val int) RETURNS kv LANGUAGE sql VOLATILE
  AS 'INSERT INTO kv (k, v) VALUES (key, val) RETURNING *';

GRANT USAGE ON SCHEMA public TO web_anon, web_user;
GRANT SELECT ON authors, publishers, books, tags, book_tags, author_profiles, employees, kv TO web_anon;
GRANT ALL ON ALL TABLES IN SCHEMA public TO web_user;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO web_user;
CREATE FUNCTION slow(seconds float) RETURNS int LANGUAGE sql STABLE AS 'SELECT 1 FROM pg_sleep(seconds)';
CREATE FUNCTION bump_volatile() RETURNS int LANGUAGE sql VOLATILE AS $$ INSERT INTO kv (k) VALUES ('volatile') RETURNING v $$;
CREATE FUNCTION pre_request() RETURNS void LANGUAGE plpgsql AS $$ BEGIN
  IF current_setting('request.headers', true)::json->>'x-block' = 'yes' THEN
    RAISE sqlstate 'PT403' USING message = 'Blocked by the pre-request function';
  END IF;
  IF current_setting('request.headers', true)::json->>'x-mark' IS NOT NULL THEN
    PERFORM set_config('response.headers', json_build_array(json_build_object(
      'X-Pre-Request', current_user))::text, true);
  END IF;
END $$;
CREATE FUNCTION label(books) RETURNS text LANGUAGE sql STABLE
  AS $$ SELECT $1.title || ' (' || $1.year || ')' $$;
CREATE FUNCTION age_at_publication(books) RETURNS int LANGUAGE sql STABLE
  AS $$ SELECT $1.year - extract(year FROM a.born)::int FROM authors a WHERE a.id = $1.author_id $$;
CREATE FUNCTION echo_total(jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE
  AS $$ SELECT jsonb_build_object('keys', (SELECT count(*) FROM jsonb_object_keys($1)), 'doc', $1) $$;
CREATE FUNCTION classics(authors) RETURNS SETOF books LANGUAGE sql STABLE
  AS $$ SELECT * FROM books WHERE author_id = $1.id AND year < 1970 ORDER BY year $$;
CREATE FUNCTION first_book(authors) RETURNS books LANGUAGE sql STABLE
  AS $$ SELECT * FROM books WHERE author_id = $1.id ORDER BY year LIMIT 1 $$;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO web_anon, web_user;

CREATE SCHEMA extra;
CREATE TABLE extra.gadgets (id int PRIMARY KEY, name text);
INSERT INTO extra.gadgets VALUES (1, 'sprocket');
CREATE TABLE extra.books (id int PRIMARY KEY, title text);
INSERT INTO extra.books VALUES (1, 'Only in extra');
GRANT USAGE ON SCHEMA extra TO web_anon, web_user;
GRANT SELECT ON ALL TABLES IN SCHEMA extra TO web_anon;
GRANT ALL ON ALL TABLES IN SCHEMA extra TO web_user;

-- PostgREST's common layout: tables in a private schema, views in the exposed one.
CREATE SCHEMA private;
CREATE TABLE private.shelves (id int PRIMARY KEY, label text);
CREATE TABLE private.shelf_books (id int PRIMARY KEY, shelf_id int REFERENCES private.shelves(id),
                                  book_id int REFERENCES books(id));
INSERT INTO private.shelves VALUES (1, 'front'), (2, 'back');
INSERT INTO private.shelf_books VALUES (1, 1, 1), (2, 1, 3), (3, 2, 5);
CREATE VIEW shelves AS SELECT id, label FROM private.shelves;
CREATE VIEW shelf_books AS SELECT id, shelf_id, book_id FROM private.shelf_books;
CREATE VIEW book_titles AS SELECT id, title AS name, author_id FROM books;
GRANT SELECT ON shelves, shelf_books, book_titles TO web_anon;
CREATE TABLE odd_names (id int PRIMARY KEY, "field-with_sep" int, "Mixed Case" text);
INSERT INTO odd_names VALUES (1, 7, 'x');
GRANT SELECT ON odd_names TO web_anon;
CREATE VIEW shelf_books_v2 AS SELECT id, shelf_id, book_id FROM shelf_books WHERE id > 1;
GRANT SELECT ON shelf_books_v2 TO web_anon;
CREATE TABLE blobs (id int PRIMARY KEY, data bytea, label text);
INSERT INTO blobs VALUES (1, '\x89504e47'::bytea, 'png'), (2, '\x0001ff'::bytea, 'raw');
GRANT SELECT ON blobs TO web_anon;
CREATE VIEW book_refs AS SELECT id AS ref, title AS headline, author_id AS writer FROM books;
GRANT SELECT ON book_refs TO web_anon;
-- Prefer: timezone, variadic functions, params=single-object (PostgREST's TimezoneSpec / RpcSpec).
CREATE TABLE stamps (id int PRIMARY KEY, t timestamptz NOT NULL);
INSERT INTO stamps VALUES (1, '2023-10-18 12:37:59.611+00'), (2, '2023-10-18 14:37:59.611+00');
GRANT SELECT ON stamps TO web_anon;
CREATE FUNCTION join_words(VARIADIC words text[]) RETURNS text LANGUAGE sql IMMUTABLE
  AS $$ SELECT array_to_string(words, ' ') $$;
CREATE FUNCTION sum_of(VARIADIC v int[]) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT sum(x)::int FROM unnest(v) x $$;
CREATE FUNCTION total_of(payload json) RETURNS numeric LANGUAGE sql IMMUTABLE
  AS $$ SELECT sum(value::numeric) FROM json_each_text(payload) $$;
GRANT EXECUTE ON FUNCTION join_words(text[]), sum_of(int[]), total_of(json) TO web_anon, web_user;
-- Full-text search on columns whose type is a domain over tsvector (searched as they are), and a
-- computed field declared without a volatility (VOLATILE, which PostgREST accepts).
CREATE DOMAIN memo_vector AS tsvector CHECK (VALUE IS NOT NULL);
CREATE DOMAIN memo_vector_nonempty AS memo_vector CHECK (VALUE <> '');
CREATE TABLE memos (id int PRIMARY KEY, body text, vec memo_vector, vec2 memo_vector_nonempty);
INSERT INTO memos VALUES (1, 'the cat sat', to_tsvector('simple', 'the cat sat'), to_tsvector('simple', 'the cat sat')),
                         (2, 'a dog ran', to_tsvector('simple', 'a dog ran'), to_tsvector('simple', 'a dog ran'));
CREATE FUNCTION shouted(memos) RETURNS text LANGUAGE sql AS $$ SELECT upper($1.body) $$;
GRANT SELECT ON memos TO web_anon;
GRANT EXECUTE ON FUNCTION shouted(memos) TO web_anon;
-- The same views in a second exposed schema: an embedding only looks in its own schema.
CREATE VIEW extra.shelves AS SELECT id, label FROM private.shelves;
CREATE VIEW extra.shelf_books AS SELECT id, shelf_id, book_id FROM private.shelf_books;
GRANT SELECT ON extra.shelves, extra.shelf_books TO web_anon;
CREATE VIEW book_years AS SELECT DISTINCT year FROM books;  -- not updatable: OPTIONS lists reads only
GRANT SELECT ON book_years TO web_anon;
CREATE TABLE "Order Items" (id int PRIMARY KEY, "Unit Price" int, "a.b(c)" text);
INSERT INTO "Order Items" VALUES (1, 150, 'cheap'), (2, 250, 'dear');
GRANT SELECT ON "Order Items" TO web_anon;
