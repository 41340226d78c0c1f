"""The cache key route() gives ``select(Model).where(Model.key == value)``
(shardkit._routing._give_cache_key): every key given must be the one SQLAlchemy works out
for a twin never routed nor compiled, and a statement derived from one given a key must
never inherit it (that would run the parent's SQL: other rows)."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.sql.cache_key import HasCacheKey

from models import User, offline_cluster


def _given(statement):
    memo = statement.__dict__.get("_generate_cache_key")
    return memo is not None and memo.__qualname__.startswith("_give_cache_key.")


def _cluster():
    c = offline_cluster(["s0", "s1", "s2"])
    for k in range(6):  # the form of select(User).where(User.id == k) made (see route())
        c.router.route(select(User).where(User.id == k))
    assert _given(_routed(c, select(User).where(User.id == 7)))
    return c


def _routed(c, statement):
    c.router.route(statement)
    return statement


def test_a_parameter_named_with_an_anonymous_parameters_key_keeps_its_name_in_the_key():
    # bindparam(<another parameter's .key>, ...): the key is an anonymous label's text, but
    # the parameter is not anonymous (SQLAlchemy puts that name itself in its cache key,
    # as for any named parameter); type(b.key) alone does not tell.
    c = _cluster()
    other = (User.id == 5).right
    id_type = User.__table__.c.id.type

    def build():
        return select(User).where(User.id == bindparam(other.key, 7, type_=id_type))
    statement, twin = _routed(c, build()), build()
    assert c.router.route(statement).shards == (c.shard_for(User, 7),)
    assert statement._generate_cache_key().key == HasCacheKey._generate_cache_key(twin).key
    # The usual anonymous parameter, of the same type, is still given the form's key.
    plain = _routed(c, select(User).where(User.id == bindparam(None, 7, type_=id_type)))
    assert _given(plain)
    assert plain._generate_cache_key().key == \
        HasCacheKey._generate_cache_key(select(User).where(User.id == 7)).key


def test_a_statement_derived_while_the_key_is_given_does_not_inherit_it():
    # Another thread derives a statement (.where(), .limit(), ...) from one route() is
    # giving its key: SQLAlchemy's _generate() copies the __dict__ but what
    # _memoized_keys names.  Between the memo's write and _memoized_keys' the copy
    # would take the parent's key, and run the parent's SQL (without the new criterion).
    # The hook below stands for that thread, deterministically.
    c = _cluster()
    statement = select(User).where(User.id == 8)
    derived = []

    class _Dict(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            if key == "_generate_cache_key":
                derived.append(statement.where(User.name == "x"))

    statement.__dict__ = _Dict(statement.__dict__)
    c.router.route(statement)
    assert _given(statement), "the key was not given: this test checks nothing"
    (d,) = derived
    assert not _given(d)
    twin = select(User).where(User.id == 8).where(User.name == "x")
    assert d._generate_cache_key().key == HasCacheKey._generate_cache_key(twin).key
    assert [b.value for b in d._generate_cache_key().bindparams] == [8, "x"]
