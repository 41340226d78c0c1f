"""How PostgreSQL sees a SQLAlchemy column type: through ``with_variant(...,
"postgresql")``, TypeDecorators and ``postgresql.DOMAIN`` types (domains over domains
too), whose values PostgreSQL stores, compares and returns as its base type's."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.types import TypeDecorator

PG_DIALECT = PGDialect()


def unwrap(type_: Any) -> tuple[Any, Any, str | None]:
    """``(domain, base, collation)`` of a column type: the outermost ``postgresql.DOMAIN``
    it is declared as (None if none), the type whose values PostgreSQL stores (through
    variants, TypeDecorators' implementations for PostgreSQL and domains), and the
    collation the outermost domain that sets one sets (None if none)."""
    domain = collation = None
    t = type_
    for _ in range(20):
        try:
            t = t.dialect_impl(PG_DIALECT)
        except Exception:  # noqa: BLE001 - a type that cannot say: judged as it is
            break
        if isinstance(t, TypeDecorator):
            t = t.impl_instance
        elif isinstance(t, postgresql.DOMAIN):
            if domain is None:
                domain = t
            collation = collation or t.collation
            t = t.data_type
        else:
            break
    return domain, t, collation
