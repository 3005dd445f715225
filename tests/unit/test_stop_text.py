"""Stop strings in streamed output: never shown, cut at the first occurrence, whatever the
chunking, and text is held back only while it could still turn into a stop string."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mlxrouter.chat import StopText


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """What the user should get: the text before the first stop string to appear, reading the
    output left to right (i.e. the stop whose end comes first; ties go to the earlier start)."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s):end] == s]
        if starts:
            return text[: min(starts)], True
    return text, False


def one_char(text: str) -> list[str]:
    return list(text)


def all_at_once(text: str) -> list[str]:
    return [text]


def pairs(text: str) -> list[str]:
    return [text[i:i + 2] for i in range(0, len(text), 2)]


def threes_offset(text: str) -> list[str]:
    return [text[:1]] + [text[i:i + 3] for i in range(1, len(text), 3)]


def with_empty_chunks(text: str) -> list[str]:
    out = []
    for ch in text:
        out += ["", ch]
    return out + [""]


CHUNKINGS: list[Callable[[str], list[str]]] = [one_char, all_at_once, pairs, threes_offset,
                                                with_empty_chunks]


def run(stops: list[str], chunks: list[str]) -> tuple[str, bool, list[str]]:
    """Feed chunks until a stop hits; return (everything the user saw, hit, per-feed outputs)."""
    st = StopText(stops)
    seen: list[str] = []
    for chunk in chunks:
        out, hit = st.feed(chunk)
        seen.append(out)
        if hit:
            return "".join(seen), True, seen
    seen.append(st.flush())
    return "".join(seen), False, seen


CASES = [
    # (stops, generated text)
    ([], "Hello world, no stops at all."),
    (["END"], "The answer is 42.END and more text"),
    (["END"], "ENDat the very start"),
    (["END"], "at the very endEND"),
    (["END"], "no stop here, but it ends with EN"),
    (["END"], "EN EN END"),
    (["END"], "EEEND"),
    (["\n\n"], "line one\nline two\n\nline three"),
    (["<|im_end|>"], "Paris is the capital.<|im_end|><|im_start|>user"),
    (["<|im_end|>"], "a < b and c <| d but <|im_en is not the end"),
    (["STOP", "halt"], "go go halt then STOP"),
    (["STOP", "halt"], "go go STOP then halt"),
    (["x"], "abcxdef"),
    (["ab", "b"], "aab"),
    (["aaa"], "aaaa"),
    (["ünï", "🎉"], "cødé ünï then 🎉"),
    (["🎉"], "party 🎉 time"),
    (["", "END"], "empty stop strings are ignored END here"),
    ([""], "only an empty stop string"),
]


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("stops, text", CASES)
def test_output_is_text_before_first_stop(stops: list[str], text: str,
                                          chunking: Callable[[str], list[str]]) -> None:
    expected, expected_hit = reference(text, stops)
    got, hit, _ = run(stops, chunking(text))
    assert got == expected
    assert hit == expected_hit


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("stops, text", CASES)
def test_stop_string_is_never_emitted(stops: list[str], text: str,
                                      chunking: Callable[[str], list[str]]) -> None:
    got, _, seen = run(stops, chunking(text))
    for s in stops:
        if s:
            assert s not in got
    # Every intermediate output is a prefix of the final answer (nothing taken back).
    shown = ""
    for piece in seen:
        shown += piece
        assert got.startswith(shown)


@pytest.mark.parametrize("text", ["", "a", "hello", "multi\nline\n\n", "ünïcødé 🎉"])
def test_without_stop_strings_everything_is_emitted_immediately(text: str) -> None:
    st = StopText([])
    assert st.feed(text) == (text, False)
    assert st.flush() == ""


@pytest.mark.parametrize("stops", [["END"], ["<|im_end|>", "\n\n"], ["a"], ["longer stop"]])
def test_held_back_text_is_at_most_longest_stop_minus_one(stops: list[str]) -> None:
    text = "zyxwvutsrqponmlkjihg" * 3  # contains none of the stops
    st = StopText(stops)
    fed = shown = ""
    for ch in text:
        fed += ch
        out, hit = st.feed(ch)
        assert not hit
        shown += out
        assert fed.startswith(shown)
        assert len(fed) - len(shown) <= max(len(s) for s in stops) - 1
    assert shown + st.flush() == text


def test_single_char_stop_holds_nothing_back() -> None:
    st = StopText(["\n"])
    assert st.feed("abc") == ("abc", False)
    assert st.feed("de") == ("de", False)
    assert st.feed("f\ng") == ("f", True)


def test_stop_split_across_chunks() -> None:
    st = StopText(["END"])
    out1, hit1 = st.feed("abcE")
    out2, hit2 = st.feed("N")
    out3, hit3 = st.feed("Dxyz")
    assert (hit1, hit2, hit3) == (False, False, True)
    assert out1 + out2 + out3 == "abc"


def test_partial_stop_that_does_not_complete_is_released() -> None:
    st = StopText(["END"])
    shown = ""
    for chunk in ["abcE", "N", "!", " more"]:
        out, hit = st.feed(chunk)
        assert not hit
        shown += out
    assert shown + st.flush() == "abcEN! more"


def test_multiple_stops_pick_the_earliest() -> None:
    st = StopText(["world", "lo"])
    assert st.feed("hello world") == ("hel", True)
    st = StopText(["zzz", "b", "a"])
    assert st.feed("xxbxa") == ("xx", True)


def test_flush_returns_held_text_once() -> None:
    st = StopText(["<|im_end|>"])
    out, hit = st.feed("Hi <|im")
    assert not hit
    held = st.flush()
    assert out + held == "Hi <|im"
    assert held.endswith("<|im")
    assert st.flush() == ""


def test_flush_after_stop_hit_is_empty() -> None:
    st = StopText(["END"])
    assert st.feed("okEND tail") == ("ok", True)
    assert st.flush() == ""


@pytest.mark.parametrize("stops, fed, expected", [
    (["END"], "abcdE", "abcd"),
    (["END"], "hello", "hello"),
    (["<|im_end|>"], "Hi there<|", "Hi there"),
    (["<|im_end|>", "\n\n"], "The capital is Paris", "The capital is Paris"),
])
def test_only_a_possible_stop_prefix_is_held_back(stops: list[str], fed: str, expected: str
                                                  ) -> None:
    st = StopText(stops)
    shown = ""
    for ch in fed:
        out, hit = st.feed(ch)
        assert not hit
        shown += out
    assert shown == expected
