"""core.db.fetch_prepared: hot statements prepared once per connection, with named parameters."""

import pytest
from django.db import connection

from marketplace.core.db import fetch_prepared

pytestmark = [pytest.mark.django_db, pytest.mark.postgres_only]

# Longer than psycopg's 4 kB query cache, as the booking engine's statements are.
PADDING = "\n".join(f"-- padding line {i:04d} " + "." * 40 for i in range(100))
LONG_STATEMENT = PADDING + """
SELECT %(a)s::int + %(b)s::int, %(a)s::int %% 4, %(label)s::text
"""


def test_named_parameters_repeated_and_a_literal_percent_in_a_long_statement():
    # given a statement over 4 kB using one parameter twice and the % operator
    assert len(LONG_STATEMENT) > 4096
    # when it runs twice with different values
    first = fetch_prepared(LONG_STATEMENT, {"a": 7, "b": 5, "label": "x"})
    second = fetch_prepared(LONG_STATEMENT, {"label": "y", "b": 1, "a": 10})
    # then each run binds its own values, by name
    assert first == [(12, 3, "x")]
    assert second == [(11, 2, "y")]


def test_the_statement_is_prepared_once_per_connection():
    # given a statement run once
    fetch_prepared("SELECT %(n)s::int AS n", {"n": 1})
    # when it runs again, then the server knows it as a prepared statement (and it still answers)
    assert fetch_prepared("SELECT %(n)s::int AS n", {"n": 2}) == [(2,)]
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT $1::int AS n%%'")
        assert cursor.fetchone()[0] == 1


def test_a_database_error_comes_out_as_djangos():
    from django.db import DataError

    with pytest.raises(DataError):
        fetch_prepared("SELECT %(n)s::int / 0", {"n": 1})
