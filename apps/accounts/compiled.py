"""Querysets compiled to SQL once, for the lookups that every API request makes.

Django compiles a queryset to SQL each time it runs it. For the token → user lookup of every request,
the caller's teams and a submission's team, compiling costs several times the CPU that PostgreSQL spends
answering (bench/README.md has the numbers), and the API's throughput on a small machine is CPU-bound.
A CompiledQuery builds the queryset once with placeholder values, keeps the SQL and the way rows become
model instances, and runs that SQL with the real values: the same SQL, through the same connection
(so it is logged and counted like any query), giving the same objects as the ORM.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections, router, transaction
from django.db.models import QuerySet, signals
from django.db.models.query import get_related_populators
from django.db.models.sql import InsertQuery


@dataclass
class _Plan:
    sql: str
    params: list  # constants, with each argument's slot marked by _Arg
    compiler: Any
    converters: dict
    model: Any | None
    init_list: list[str]
    model_slice: slice
    related_populators: list
    annotation_col_map: dict


@dataclass(frozen=True)
class _Arg:
    index: int


class CompiledQuery:
    """`build(*values)` returns the queryset; `placeholders` are one value per argument, of the
    argument's type and unlike any real value, by which the arguments are found in the compiled SQL's
    parameters. Arguments of another type than their placeholder go through the ORM as usual."""

    def __init__(self, build: Callable[..., QuerySet], *placeholders: Any) -> None:
        self.build = build
        self.placeholders = placeholders
        self._alias: str | None = None
        # Per thread: a compiler holds its thread's connection, which its converters may consult.
        self._local = threading.local()

    def _plan(self, alias: str) -> _Plan:
        plans = self._local.__dict__.setdefault("plans", {})
        plan = plans.get(alias)
        if plan is None:
            plan = plans[alias] = self._compile(alias)
        return plan

    def _compile(self, alias: str) -> _Plan:
        queryset = self.build(*self.placeholders)
        compiler = queryset.query.get_compiler(using=alias)
        sql, params = compiler.as_sql()
        marked = list(params)
        for index, placeholder in enumerate(self.placeholders):
            if str(placeholder) in sql:  # e.g. a slice bound: written into the SQL, it would stay fixed
                raise ValueError(f"placeholder {placeholder!r} is written into the SQL, not passed: {sql}")
            slots = [i for i, value in enumerate(params) if type(value) is type(placeholder) and value == placeholder]
            if not slots:
                raise ValueError(f"placeholder {placeholder!r} is not a parameter of {sql}")
            for i in slots:
                marked[i] = _Arg(index)
        select = compiler.select
        converters = compiler.get_converters([s[0] for s in select[: compiler.col_count]])
        klass_info = compiler.klass_info
        if klass_info is None:  # values() / values_list(): rows as they are
            return _Plan(sql, marked, compiler, converters, None, [], slice(0), [], {})
        fields = klass_info["select_fields"]
        model_slice = slice(fields[0], fields[-1] + 1)
        return _Plan(
            sql=sql, params=marked, compiler=compiler, converters=converters, model=klass_info["model"],
            init_list=[f[0].target.attname for f in select[model_slice]], model_slice=model_slice,
            related_populators=get_related_populators(klass_info, select, alias),
            annotation_col_map=compiler.annotation_col_map or {},
        )

    def _database(self) -> str:
        if self._alias is None:
            self._alias = self.build(*self.placeholders).db
        return self._alias

    def _fits(self, args: Sequence) -> bool:
        return len(args) == len(self.placeholders) and all(
            type(a) is type(p) for a, p in zip(args, self.placeholders, strict=True))

    def _rows(self, alias: str, args: Sequence) -> tuple[_Plan, list]:
        plan = self._plan(alias)
        params = [args[p.index] if isinstance(p, _Arg) else p for p in plan.params]
        with connections[alias].cursor() as cursor:
            cursor.execute(plan.sql, params)
            rows = cursor.fetchall()
        if plan.converters:
            rows = list(plan.compiler.apply_converters(rows, plan.converters))
        return plan, rows

    def objects(self, *args: Any) -> list:
        """The model instances the queryset would give, select_related objects attached."""
        if not self._fits(args):
            return list(self.build(*args))
        alias = self._database()
        plan, rows = self._rows(alias, args)
        out = []
        for row in rows:
            obj = plan.model.from_db(alias, plan.init_list, row[plan.model_slice])
            for populator in plan.related_populators:
                populator.populate(row, obj)
            for name, position in plan.annotation_col_map.items():
                setattr(obj, name, row[position])
            out.append(obj)
        return out

    def values(self, *args: Any) -> list[tuple]:
        """Rows of a values_list() queryset, as tuples."""
        if not self._fits(args):
            return [tuple(row) if isinstance(row, list | tuple) else (row,) for row in self.build(*args)]
        _, rows = self._rows(self._database(), args)
        return [tuple(row) for row in rows]


@dataclass
class _InsertPlan:
    sql: str
    compiler: Any
    fields: list
    returning_fields: list
    returning_converters: dict


class CompiledInsert:
    """`Model.objects.create(**values)`, with the INSERT built once per thread and database.

    It does what Model.save() does for a new row: the pre_save signal, each field's pre_save
    (auto_now_add), the INSERT, the returned primary key, the instance's state, the post_save signal.
    It does not call an overridden save(): use it for models whose save() adds nothing to a new row.
    A value that is an expression (F(), Now()) makes other SQL: that row goes through save() instead.
    """

    def __init__(self, model: Any) -> None:
        if model._meta.parents or model._meta.proxy:
            raise ValueError("CompiledInsert takes a concrete model without multi-table inheritance.")
        self.model = model
        self._local = threading.local()

    def _plan(self, alias: str) -> _InsertPlan:
        plans = self._local.__dict__.setdefault("plans", {})
        plan = plans.get(alias)
        if plan is None:
            plan = plans[alias] = self._compile(alias)
        return plan

    def _compile(self, alias: str) -> _InsertPlan:
        meta = self.model._meta
        # The fields Model._save_table() inserts for a row whose primary key the database assigns.
        fields = [f for f in meta.local_concrete_fields if not f.generated and f is not meta.auto_field]
        query = InsertQuery(self.model)
        query.insert_values(fields, [self.model()])
        compiler = query.get_compiler(using=alias)
        compiler.returning_fields = meta.db_returning_fields
        [(sql, _)] = compiler.as_sql()
        connection = connections[alias]
        returning = meta.db_returning_fields if connection.features.can_return_columns_from_insert else [meta.pk]
        converters = compiler.get_converters([f.get_col(meta.db_table) for f in returning])
        return _InsertPlan(sql, compiler, fields, returning, converters)

    def create(self, **values: Any) -> Any:
        obj = self.model(**values)
        alias = router.db_for_write(self.model, instance=obj)
        obj._prepare_related_fields_for_save(operation_name="save")
        signals.pre_save.send(sender=self.model, instance=obj, raw=False, using=alias, update_fields=None)
        plan = self._plan(alias)
        row = [field.pre_save(obj, True) for field in plan.fields]
        if any(hasattr(value, "resolve_expression") for value in row):
            obj.save_base(using=alias, force_insert=True)  # sends the signals itself
            return obj
        connection = connections[alias]
        params = [plan.compiler.prepare_value(field, value) for field, value in zip(plan.fields, row, strict=True)]
        with transaction.mark_for_rollback_on_error(using=alias), connection.cursor() as cursor:
            if connection.features.can_return_columns_from_insert:
                cursor.execute(plan.sql, [*params, *plan.compiler.returning_params])
                returned = connection.ops.fetch_returned_insert_columns(cursor, plan.compiler.returning_params)
            else:
                cursor.execute(plan.sql, params)
                returned = (connection.ops.last_insert_id(cursor, self.model._meta.db_table,
                                                          self.model._meta.pk.column),)
        if plan.returning_converters:
            returned = next(iter(plan.compiler.apply_converters([returned], plan.returning_converters)))
        for value, field in zip(returned, plan.returning_fields, strict=True):
            setattr(obj, field.attname, value)
        obj._state.db = alias
        obj._state.adding = False
        signals.post_save.send(sender=self.model, instance=obj, created=True, update_fields=None, raw=False,
                               using=alias)
        return obj
