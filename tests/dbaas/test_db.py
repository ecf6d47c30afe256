"""dbaas.db.array_literal: whatever a guest may put in a string comes back from PostgreSQL
as it was sent (quotes, backslashes, braces, commas, the word NULL), floats exactly."""

from sqlalchemy import Float, String, create_engine, select

from dbaas import db


def test_array_literals_round_trip_through_postgresql(postgres):
    texts = ['a"b', "c\\d", None, "x,y}", "{z}", "NULL", " spaced ", "", "é✓", '\\"', "'; DROP TABLE x; --"]
    floats = [1764770000.123456, 1e-300, 1.7976931348623157e308, 0.1, -2.5, 123.0]
    engine = create_engine(postgres.url)
    try:
        with engine.connect() as connection:
            got_texts, got_floats = connection.execute(
                select(db.array_parameter("texts", String), db.array_parameter("floats", Float)),
                {"texts": db.array_literal(texts), "floats": db.array_literal(floats)}).one()
    finally:
        engine.dispose()
    assert got_texts == texts
    assert got_floats == floats
