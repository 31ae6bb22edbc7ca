"""Age groups: presets, custom edges, the edges themselves, gaps, and names."""

from __future__ import annotations

import pytest

from tune_age.data.groups import make_groups
from tune_age.errors import ConfigError


@pytest.mark.parametrize(
    "spec, age, name",
    [
        ("decades", 0, "0-9"), ("decades", 9, "0-9"), ("decades", 10, "10-19"), ("decades", 89, "80-89"),
        ("decades", 90, "90+"), ("decades", 130, "90+"), ("decades", 9.99, "0-9"),
        ("fairface", 2, "0-2"), ("fairface", 3, "3-9"), ("fairface", 9, "3-9"), ("fairface", 10, "10-19"),
        ("fairface", 69, "60-69"), ("fairface", 70, "70+"),
        ("adience", 2, "0-2"), ("adience", 3, "0-2"), ("adience", 4, "4-6"), ("adience", 7, "4-6"),
        ("adience", 13, "8-12"), ("adience", 14, "15-20"), ("adience", 22, "15-20"), ("adience", 23, "25-32"),
        ("adience", 59, "60+"), ("adience", 100, "60+"),
        ("0,13,20,40,60", 12, "0-12"), ("0,13,20,40,60", 13, "13-19"), ("0,13,20,40,60", 60, "60+"),
    ],
)
def test_ages_land_in_the_right_group_at_the_edges(spec, age, name):
    groups = make_groups(spec)
    assert groups.names[groups.index_of_age(age)] == name


def test_presets_have_the_documented_groups():
    assert make_groups("decades").names == [f"{a}-{a + 9}" for a in range(0, 90, 10)] + ["90+"]
    assert make_groups("adience").names == ["0-2", "4-6", "8-12", "15-20", "25-32", "38-43", "48-53", "60+"]
    assert make_groups("fairface").names[:3] == ["0-2", "3-9", "10-19"] and make_groups("fairface").names[-1] == "70+"
    assert make_groups("0,13,20,40,60").names == ["0-12", "13-19", "20-39", "40-59", "60+"]


def test_names_and_bad_specs_fail_with_what_is_valid():
    groups = make_groups("fairface")
    assert groups.index_of_name(" 20-29 ") == 3
    with pytest.raises(ConfigError, match=r"age group 'twenties' is not a group of bins 'fairface'; valid: 0-2, 3-9"):
        groups.index_of_name("twenties")
    with pytest.raises(ConfigError, match="neither a preset"):
        make_groups("ages")
    with pytest.raises(ConfigError, match="must start at 0 and increase"):
        make_groups("5,10,20")
    with pytest.raises(ConfigError, match="must start at 0 and increase"):
        make_groups("0,20,10")
    with pytest.raises(ValueError, match="outside 0-130"):
        groups.index_of_age(-1)
