"""Models shared by the test suite: one group of each strategy, colocated tables, a reference table."""

from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    orders: Mapped[list[Order]] = relationship(back_populates="user", lazy="select")


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    amount: Mapped[int] = mapped_column(Integer, default=0)
    user: Mapped[User] = relationship(back_populates="orders")


class Country(Base):
    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    payload: Mapped[str] = mapped_column(String(100), default="")


class Customer(Base):
    __tablename__ = "customers"
    region: Mapped[str] = mapped_column(String(8), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100), default="")


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    label: Mapped[str] = mapped_column(String(100), default="")


def groups_config(shards: list[str]) -> dict:
    """The ``groups`` / ``reference_tables`` part of the config for these models."""
    s0, s1 = shards[0], shards[1]
    last = shards[-1]
    return {
        "groups": {
            "users": {"strategy": "hash", "tables": {"users": "id", "orders": "user_id"}},
            "devices": {"strategy": "hash", "tables": {"devices": "id"}},
            "events": {
                "strategy": "range",
                "ranges": [
                    {"to": 1000, "shard": s0},
                    {"from": 1000, "to": 5000, "shard": s1},
                    {"from": 5000, "shard": last},
                ],
            "tables": {"events": "id"},
            },
            "customers": {
                "strategy": "list",
                "values": {s0: ["eu", "uk"], s1: ["us", "ca"]},
                "default": last,
                "tables": {"customers": "region"},
            },
        },
        "reference_tables": ["countries"],
    }


def offline_cluster(shards: list[str] | None = None):  # noqa: ANN201 - a shardkit.Cluster
    """A cluster of these models over shards ``s0``-``s2`` whose servers are never reached
    (for routing decisions with no server)."""
    from shardkit import Cluster

    names = shards or ["s0", "s1", "s2"]
    return Cluster.from_config({
        "bucket_count": 64,
        "shards": [{"name": s, "primary": f"postgresql+psycopg://u@{s}.invalid/db"} for s in names],
        **groups_config(names),
    }, metadata=Base.metadata)
