"""Statements compiled once and run through the driver's own executemany.

``Connection.execute`` with a list of parameter sets makes SQLAlchemy compile-cache-look
up the statement and build and convert every set, value by value. For the sender's
batches of small rows that Python costs more than the database's own work, and it holds
the GIL the event loop needs. A ``DriverStatement`` is compiled once for a dialect; each
call converts the values through the conversions SQLAlchemy itself would apply (the
dialect's bind processors, e.g. SQLite's text for a datetime), puts them in the order
the driver's paramstyle wants and hands them to ``exec_driver_sql``: the same rows,
written the same way.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.expression import UpdateBase


class DriverStatement:
    """``statement`` compiled for ``dialect``, run for many parameter sets at once.

    Every bind parameter without a value (``bindparam("name")``, or an INSERT's
    ``column_keys``) must be given, in each set or in the ``shared`` values of a call;
    those with a value (the statement's own constants) are filled in."""

    def __init__(
        self,
        statement: UpdateBase,
        dialect: Dialect,
        column_keys: Sequence[str] | None = None,
    ) -> None:
        keys = list(column_keys) if column_keys is not None else None
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        self.sql = compiled.string
        binds = compiled.binds
        self.required = frozenset(name for name, bind in binds.items() if bind.required)
        self._convert: dict[str, Callable[[Any], Any]] = {}
        for name, bind in binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._convert[name] = processor
        self._constants = {
            name: self._convert.get(name, _unchanged)(bind.value)
            for name, bind in binds.items()
            if not bind.required
        }
        #: Placeholder order for positional paramstyles (SQLite's qmark); None when the
        #: driver takes names (psycopg's pyformat).
        positions = compiled.positiontup
        self._ordered: Callable[[dict[str, Any]], Any] | None = None
        if positions is not None:
            getter = operator.itemgetter(*positions)
            self._ordered = (lambda row: (getter(row),)) if len(positions) == 1 else getter

    def execute(
        self,
        conn: Connection,
        parameter_sets: Sequence[Mapping[str, Any]],
        shared: Mapping[str, Any] | None = None,
    ) -> int:
        """Run the statement once per parameter set (the driver's executemany);
        ``shared``: values every set has, converted once. Returns the rows it changed, as
        the driver counts them (-1 when it cannot tell)."""
        if not parameter_sets:
            return 0
        shared = shared or {}
        missing = self.required - parameter_sets[0].keys() - shared.keys()
        if missing:
            raise ValueError(f"missing bind parameter(s): {', '.join(sorted(missing))}")
        convert = self._convert
        base = dict(self._constants)
        for name, value in shared.items():
            base[name] = convert.get(name, _unchanged)(value)
        rows = []
        for given in parameter_sets:
            row = dict(base)
            for name, value in given.items():
                processor = convert.get(name)
                row[name] = value if processor is None else processor(value)
            rows.append(row)
        if self._ordered is None:
            result = conn.exec_driver_sql(self.sql, rows)
        else:
            ordered = self._ordered
            result = conn.exec_driver_sql(self.sql, [ordered(row) for row in rows])
        return int(result.rowcount)


def _unchanged(value: Any) -> Any:
    return value
