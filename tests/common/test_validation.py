import math
from collections.abc import Callable, Sequence
from typing import Literal

import pytest

from lightning_nt.common.validation import ArgumentError, above, at_least, between, checked_arguments, non_empty


class Configured:
    @checked_arguments(
        count=at_least(1),
        share=between(0, 1, low_open=True, high_open=True),
        steps=(non_empty(), above(0)),
        budget=between(0, 1, low_open=True),
    )
    def __init__(
        self,
        count: int = 1,
        share: float = 0.5,
        flag: bool = False,
        mode: Literal["a", "b"] = "a",
        steps: Sequence[float] = (1.0,),
        budget: float | None = None,
        fn: Callable[[int], int] | None = None,
    ) -> None:
        self.count = count


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": "3"}, "`count` must be an integer"),
        ({"count": 2.5}, "`count` must be an integer"),
        ({"count": math.nan}, "`count` must be an integer"),
        ({"count": True}, "`count` must be an integer"),
        ({"count": 0}, "`count` must be >= 1"),
        ({"share": math.nan}, "`share` must be a finite number"),
        ({"share": math.inf}, "`share` must be a finite number"),
        ({"share": "0.5"}, "`share` must be a finite number"),
        ({"share": 1.0}, r"`share` must be in \(0, 1\)"),
        ({"flag": "no"}, "`flag` must be True or False"),
        ({"flag": 0}, "`flag` must be True or False"),
        ({"mode": "c"}, "`mode` must be one of"),
        ({"steps": ()}, "`steps` must be non-empty"),
        ({"steps": (1.0, -1.0)}, "`steps` must be > 0"),
        ({"steps": "12"}, "`steps` must be a sequence"),
        ({"budget": 0.0}, r"`budget` must be None or in \(0, 1\]|`budget` must be in \(0, 1\]"),
        ({"budget": math.inf}, "`budget` must be a finite number or None"),
        ({"fn": 3}, "`fn` must be callable or None"),
    ],
)
def test_bad_arguments_are_named_with_what_they_may_be(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        Configured(**kwargs)


def test_good_arguments_pass_and_the_error_is_both_value_and_type_error():
    Configured(count=3, share=0.25, flag=True, mode="b", steps=[0.5, 2], budget=1.0, fn=abs)
    with pytest.raises(ValueError):
        Configured(count=0)
    with pytest.raises(TypeError):
        Configured(count="0")


def test_the_signature_seen_by_inspect_is_the_original():
    import inspect

    assert list(inspect.signature(Configured.__init__).parameters)[:3] == ["self", "count", "share"]


def test_rules_for_unknown_arguments_are_a_programming_error():
    with pytest.raises(TypeError, match="does not take"):

        @checked_arguments(missing=at_least(1))
        def function(present: int = 1) -> None: ...
