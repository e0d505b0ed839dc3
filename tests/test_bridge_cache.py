"""The vocabulary bridge kept on disk (proxyclient.bridge_cache): round trip, damaged files, format
changes, clipping to what the proxies score, and special tokens paired by role."""

from pathlib import Path

import pytest
import torch

from proxyclient import bridge_cache
from proxyclient.bridge import VocabBridge, pair_fingerprint
from proxyclient.tokenizer import BaseTokenizer
from tests.support.other_tokenizers import metaspace_tokenizer, tiktoken_encoding


@pytest.fixture(scope="module")
def pair(hf_models):
    """A byte-level base and a Metaspace proxy: different vocabularies, EOS ids 1 and 2."""
    return BaseTokenizer(hf_models["tokenizer"]), BaseTokenizer(metaspace_tokenizer())


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYCLIENT_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def builds(monkeypatch):
    """Counts the bridges built (rather than loaded)."""
    count = []
    build = VocabBridge.build.__func__

    def counting(cls, *args, **kwargs):
        count.append(1)
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(VocabBridge, "build", classmethod(counting))
    return count


def bridge_of(base, proxy, size=None):
    eos = frozenset({proxy.eos_token_id})
    return bridge_cache.cached_bridge(base, proxy.vocab, eos, size or len(proxy.vocab))


def cached_path(cache: Path, base, proxy) -> Path:
    name = f"{pair_fingerprint(base.vocab, proxy.vocab)}-v{bridge_cache.FORMAT}.pt"
    return cache / "bridges" / name


def same(a: VocabBridge, b: VocabBridge) -> bool:
    return (
        torch.equal(a.twin, b.twin)
        and torch.equal(a.prefix, b.prefix)
        and (a.base_size, a.proxy_size) == (b.base_size, b.proxy_size)
    )


def test_the_folder_is_the_variable_else_the_home_cache(cache, monkeypatch, tmp_path):
    """$PROXYCLIENT_CACHE_DIR when set (as every test here, and conftest for the session, set
    it), else ~/.cache/proxyclient."""
    assert bridge_cache.cache_dir() == cache
    monkeypatch.delenv("PROXYCLIENT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bridge_cache.cache_dir() == tmp_path / "home" / ".cache" / "proxyclient"


def test_saved_then_loaded_without_building_again(pair, cache, builds):
    base, proxy = pair
    built = bridge_of(base, proxy)
    path = cached_path(cache, base, proxy)
    assert path.is_file() and len(builds) == 1
    assert not list(path.parent.glob("*.tmp"))  # written whole, then renamed
    loaded = bridge_of(base, proxy)
    assert len(builds) == 1, "the second call loads the file"
    assert same(loaded, built)
    fresh = VocabBridge.build(base.vocab, proxy.vocab, {base.eos_token_id: proxy.eos_token_id})
    assert torch.equal(loaded.twin, fresh.twin) and torch.equal(loaded.prefix, fresh.prefix)


def test_a_cached_file_is_what_is_used(pair, cache):
    """The bridge comes from the file when there is one (here a doctored one)."""
    base, proxy = pair
    bridge_of(base, proxy)
    path = cached_path(cache, base, proxy)
    maps = torch.load(path, weights_only=True)
    maps["twin"][5] = 7
    torch.save(maps, path)
    assert bridge_of(base, proxy).twin[5] == 7


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a dict", "missing prefix"])
def test_a_damaged_file_is_rebuilt_not_a_crash(pair, cache, builds, damage):
    base, proxy = pair
    good = bridge_of(base, proxy)
    path = cached_path(cache, base, proxy)
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not a dict":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"twin": good.twin}, path)
    assert same(bridge_of(base, proxy), good)
    assert len(builds) == 2
    assert same(bridge_of(base, proxy), good) and len(builds) == 2, "the rebuilt file is cached"


@pytest.mark.parametrize("garbage", [b"this is not a torch file\n" * 10, b"tiny-base\n"])
def test_a_garbage_file_is_rebuilt_not_a_crash(pair, cache, builds, garbage):
    base, proxy = pair
    good = bridge_of(base, proxy)
    cached_path(cache, base, proxy).write_bytes(garbage)
    assert same(bridge_of(base, proxy), good)


def test_a_new_format_never_reads_an_old_file(pair, cache, builds, monkeypatch):
    base, proxy = pair
    bridge_of(base, proxy)
    old = cached_path(cache, base, proxy)
    maps = torch.load(old, weights_only=True)
    maps["twin"][5] = 7  # what the old format's file says differs from what is built now
    torch.save(maps, old)
    monkeypatch.setattr(bridge_cache, "FORMAT", bridge_cache.FORMAT + 1)
    bridge = bridge_of(base, proxy)
    assert len(builds) == 2 and bridge.twin[5] != 7
    assert cached_path(cache, base, proxy).is_file() and old.is_file()


def test_a_changed_vocabulary_never_reads_the_old_pair(pair, cache, builds):
    base, proxy = pair
    bridge_of(base, proxy)
    other = BaseTokenizer(tiktoken_encoding())
    bridge_of(other, proxy)
    assert len(builds) == 2
    assert len(list((cache / "bridges").glob("*.pt"))) == 2


def test_clipped_to_the_ids_the_proxies_score(pair, builds):
    """A proxy model may score fewer ids than its tokenizer has (or more: padding); twins and
    prefixes past what it scores are -1, whatever size the cached file was built for."""
    base, proxy = pair
    full = bridge_of(base, proxy)
    size = len(proxy.vocab) // 2
    clipped = bridge_of(base, proxy, size)
    assert len(builds) == 1, "the cache holds the unclipped maps: one file for every size"
    assert (clipped.base_size, clipped.proxy_size) == (len(base.vocab), size)
    for name in ("twin", "prefix"):
        whole, cut = getattr(full, name), getattr(clipped, name)
        assert (whole >= size).any(), "the test clips something"
        assert torch.equal(cut, torch.where(whole < size, whole, torch.tensor(-1)))
        assert int(cut.max()) < size
    assert 0 < clipped.shared < full.shared
    padded = bridge_of(base, proxy, len(proxy.vocab) + 64)
    assert torch.equal(padded.twin, full.twin) and padded.proxy_size == len(proxy.vocab) + 64


@pytest.mark.parametrize("base_kind", ["byte-level", "tiktoken"])
def test_eos_pairs_with_the_proxies_eos_by_role(pair, base_kind):
    """The two EOS tokens have different ids (and, for tiktoken's <|endoftext|>, different text;
    special tokens have no bytes to match): the base's EOS maps to the proxies' EOS all the same."""
    hf_base, proxy = pair
    base = hf_base if base_kind == "byte-level" else BaseTokenizer(tiktoken_encoding())
    base_eos, proxy_eos = base.eos_token_id, proxy.eos_token_id
    assert base_eos != proxy_eos and base.vocab.token_bytes[base_eos] is None
    unpaired = VocabBridge.build(base.vocab, proxy.vocab)
    assert unpaired.twin[base_eos] == -1, "no byte match: the pairing is cached_bridge's doing"
    for _ in range(2):  # built, then loaded
        bridge = bridge_of(base, proxy)
        assert bridge.twin[base_eos] == proxy_eos
        assert bridge.prefix[base_eos] == proxy_eos


def test_of_several_proxy_eos_ids_the_lowest(pair):
    base, proxy = pair
    eos = frozenset({proxy.eos_token_id, 0})
    bridge = bridge_cache.cached_bridge(base, proxy.vocab, eos, len(proxy.vocab))
    assert bridge.twin[base.eos_token_id] == 0
