"""Keys: one hash tag for the whole registry, and no collisions between kinds of key."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from quart_wslb.contract import LAYOUT
from quart_wslb.keys import Keys, shard_of, shard_tag

#: Values chosen to look like separators, hash tags, globs and other kinds of key.
ADVERSARIAL = [
    "a",
    "b",
    "a=b",
    "b=c",
    "a:b",
    "b:c",
    "a:b:c",
    "1:a",
    "3:a:b",
    ":",
    "::",
    "u:a",
    "p:a",
    "m:1:a:b",
    "{t}",
    "}",
    "{",
    "*",
    "a*",
    "conns",
    "all",
    "instances",
    "é",
    "éé:x",
]
NAMES = ["a", "a:b", "a=b", "1", "1:a", "é", ":"]


def every_key(keys: Keys) -> dict[str, tuple[str, ...]]:
    """Every registry key built from ``ADVERSARIAL`` values, mapped to how it was built;
    a collision would show up as two builders for one key."""
    built: dict[str, tuple[str, ...]] = {}

    def add(key: str, *how: str) -> None:
        assert key not in built, f"{how} collides with {built[key]}: {key!r}"
        built[key] = how

    add(keys.users, "users")
    add(keys.layout, "layout")
    add(keys.instances, "instances")
    add(keys.history, "history")
    add(keys.history_meta, "history_meta")
    for value in ADVERSARIAL:
        add(keys.session(value), "session", value)
        add(keys.records(value), "records", value)
        add(keys.heartbeat(value), "heartbeat", value)
        add(keys.reap_lock(value), "reap_lock", value)
        add(keys.group(value), "group", value)
        add(keys.user_set(value), "user_set", value)
        add(keys.path(value), "path", value)
    for name in dict.fromkeys([*NAMES, *ADVERSARIAL]):
        for value in ADVERSARIAL:
            add(keys.metadata(name, value), "metadata", name, value)
    return built


def test_keys_never_collide_across_kinds_or_values() -> None:
    built = every_key(Keys("t"))
    assert len(built) == 5 + 7 * len(ADVERSARIAL) + len(set(NAMES + ADVERSARIAL)) * len(
        ADVERSARIAL
    )


@pytest.mark.parametrize(
    ("one", "two"),
    [
        (("a=b", "c"), ("a", "b=c")),
        (("a", "b:c"), ("a:b", "c")),
        (("a:b", "c"), ("a", "b:c")),
        (("1", "1:a"), ("1:a", "")),
        (("ab", "c"), ("a", "bc")),
    ],
)
def test_keys_metadata_pairs_stay_apart(one: tuple[str, str], two: tuple[str, str]) -> None:
    keys = Keys("t")
    assert keys.metadata(*one) != keys.metadata(*two)


def test_keys_channels_never_collide() -> None:
    keys = Keys("t")
    channels = [keys.channel(value) for value in ADVERSARIAL] + [keys.broadcast]
    assert len(set(channels)) == len(channels)


@pytest.mark.parametrize("prefix", ["t", "wslb", "app:prod", "a.b-c_d"])
def test_keys_share_the_prefix_hash_tag(prefix: str) -> None:
    keys = Keys(prefix)
    slot = key_slot(prefix.encode())
    for key in every_key(keys):
        assert key.startswith("{" + prefix + "}:")
        assert key_slot(key.encode()) == slot, key


def test_keys_prefixes_never_share_a_key() -> None:
    one, two = every_key(Keys("a")), every_key(Keys("a:u"))
    assert not set(one) & set(two)


def test_keys_values_are_the_last_component() -> None:
    keys = Keys("t")
    for value in ADVERSARIAL:
        for key in (
            keys.group(value),
            keys.path(value),
            keys.metadata("n", value),
            keys.user_set(value),
        ):
            assert key.endswith(":" + value)
    assert keys.metadata("room", "red") == "{t}:m:4:room:red"
    assert keys.metadata("café", "x") == "{t}:m:5:café:x"  # bytes, as Lua counts


def test_keys_holders_sit_beside_each_index_set_and_collide_with_nothing() -> None:
    keys = Keys("p")
    assert keys.holders(keys.group("a:b")) == "{p}:ig:a:b"
    assert keys.holders(keys.path("/x")) == "{p}:ip:/x"
    assert keys.holders(keys.metadata("n", "v")) == "{p}:im:1:n:v"
    fixed = {keys.users, keys.instances, keys.layout, keys.records("i"), keys.user_set("u")}
    assert not fixed & {keys.holders(keys.group(n)) for n in ("users", "c:i", "u:u", "")}
    with pytest.raises(ValueError, match="not a key under"):
        keys.holders("{q}:g:a")


def test_keys_views_name_each_shard_under_its_own_hash_tag() -> None:
    keys = Keys("app", shards=3)
    # app|1 hashes outside the middle third of the slots: salted (see shard_tag).
    assert [view.users for view in keys.views] == [
        "{app|0}:users",
        "{app|1.2}:users",
        "{app|2}:users",
    ]
    assert keys.view(0) is keys and all(view.views == keys.views for view in keys.views)
    assert Keys("app").views == (Keys("app"),) and Keys("app").users == "{app}:users"
    assert keys.view(2).channel("i1") == "{app|2}:ch:i1"
    assert keys.view(1).move(keys.group("g")) == "{app|1.2}:g:g"
    assert keys.move(keys.view(2).path("/x")) == "{app|0}:p:/x"


@pytest.mark.parametrize("shards", [2, 3, 16, 256])
def test_keys_shard_tags_take_each_its_share_of_the_slots(shards: int) -> None:
    """Shard n's slot lies in the n-th 1/shards of the slot space, so shards spread
    evenly over masters owning equal ranges, whatever the prefix."""
    for prefix in ("wslb", "app", "test-1a2b3c4d"):
        tags = [shard_tag(prefix, n, shards) for n in range(shards)]
        slots = [key_slot(tag.encode()) for tag in tags]
        assert [slot * shards // 16384 for slot in slots] == list(range(shards)), prefix
        assert all(tag.startswith("{" + prefix + "|") for tag in tags)
        assert len(set(tags)) == shards


def test_keys_shards_of_another_prefix_never_collide() -> None:
    """No prefix has a ``|``: a shard's hash tag is never a prefix's own."""
    sharded = {view.users for view in Keys("a", shards=4).views}
    assert not sharded & {Keys(p).users for p in ("a", "a:0", "a.0", "a-0", "a|0"[:1])}


def test_keys_token_places_a_users_connection_in_the_users_shard() -> None:
    keys = Keys("t", shards=8)
    for user in ("ann", "bob", "ünï", "a b"):
        for _ in range(20):
            id = f"i1:{keys.token('i1', user)}"
            assert keys.of_connection(id) is keys.of_user(user), (user, id)
    assert len(keys.token("i1", None)) == 16 and len(Keys("t").token("i1", "ann")) == 16


def test_keys_split_groups_ids_by_shard_in_order() -> None:
    keys = Keys("t", shards=4)
    ids = [f"i{n}:x{n}" for n in range(30)]
    parts = keys.split(ids)
    assert [view.shard for view, _ in parts] == sorted({shard_of(i, 4) for i in ids})
    assert sorted(i for _, part in parts for i in part) == sorted(ids)
    assert all(keys.of_connection(i) is view for view, part in parts for i in part)
    assert Keys("t").split(ids) == [(Keys("t"), ids)]


def test_keys_layout_value_records_the_count_of_shards() -> None:
    assert Keys("t").layout_value == LAYOUT
    assert Keys("t", shards=16).layout_value == f"{LAYOUT}|16"


@pytest.mark.parametrize(("shards", "shard"), [(0, 0), (257, 0), (4, 4), (4, -1)])
def test_keys_refuse_a_shard_out_of_range(shards: int, shard: int) -> None:
    with pytest.raises(ValueError, match="shard"):
        Keys("t", shards=shards, shard=shard)
