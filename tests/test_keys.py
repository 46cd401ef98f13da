"""Metric keys are built and parsed by `priorlab.keys` alone: building then parsing gives the parts back."""

import math

import pytest

from priorlab import keys


@pytest.mark.parametrize(
    ("parts", "text"),
    [
        (dict(group="cond", metric="fd", prior="base", scale=2.0), "eval/cond/fd/prior=base/w=2.0"),
        (dict(group="cond", metric="fd_class=3", prior="self", scale=1.5), "eval/cond/fd_class=3/prior=self/w=1.5"),
        (dict(group="prior", metric="loss", model="self", bucket="t=0-99"), "eval/prior/loss/model=self/t=0-99"),
        (
            dict(group="prior", metric="loss", model="mix", scale=7.5, bucket="all"),
            "eval/prior/loss/model=mix/w=7.5/all",
        ),
        (dict(group="prior", metric="disagreement", bucket="all"), "eval/prior/disagreement/all"),
        (dict(group="uncond", metric="kid", model="base"), "eval/uncond/kid/model=base"),
        (
            dict(group="calib", metric="weight", prior="auto", scale=4, bucket="t=900-999"),
            "eval/calib/weight/prior=auto/w=4.0/t=900-999",
        ),
        (
            dict(group="calib", metric="check_nll", model="checked", scale=0.25),
            "eval/calib/check_nll/model=checked/w=0.25",
        ),
        (dict(group="diff", metric="accuracy_se", prior="mix", scale=3.0), "eval/diff/accuracy_se/prior=mix/w=3.0"),
        (dict(group="cond", metric="num_classes"), "eval/cond/num_classes"),
        (dict(group="grid", prior="base"), "eval/grid/prior=base"),
    ],
)
def test_build_then_parse_gives_the_parts_back(parts, text):
    built = keys.key(**parts)
    assert built == text
    back = keys.parse(built)
    expected = keys.Key(**{**parts, "scale": None if "scale" not in parts else float(parts["scale"])})
    assert back == expected
    assert keys.key(**{k: v for k, v in vars(back).items()}) == built


def test_row_parts_are_the_results_table_columns():
    assert keys.row_parts("eval/calib/loss/model=self/w=2.0/t=0-99") == ("calib_loss/t=0-99", "self", 2.0)
    metric, prior, scale = keys.row_parts("eval/prior/disagreement/all")
    assert (metric, prior) == ("disagreement/all", "") and math.isnan(scale)


def test_scale_and_bucket_names_round_trip():
    for w in (1.0, 2.0, 1.5, 7.5, 0.25, 12.0):
        assert keys.scale_of(keys.scale_name(w)) == w
    assert keys.scale_name(2) == "w=2.0" and keys.scale_name(1.5) == "w=1.5"
    edges = [0, 100, 200, 1000]
    assert [keys.bucket_name(edges, b) for b in range(3)] == ["t=0-99", "t=100-199", "t=200-999"]
    assert keys.bucket_bounds("loss/t=100-199") == (100, 199) and keys.bucket_bounds("t=200-999") == (200, 999)
    assert keys.bucket_bounds("loss/all") is None
    with pytest.raises(ValueError):
        keys.Key("prior", "loss", prior="auto", model="self")


def test_a_paired_difference_against_self_keeps_the_key_without_vs():
    assert keys.diff_metric("fd", "self") == "fd_se"
    assert keys.diff_metric("nll", "base") == "nll_se_vs_base"
    assert (
        keys.key("diff", keys.diff_metric("fd", "small"), prior="base", scale=2)
        == "eval/diff/fd_se_vs_small/prior=base/w=2.0"
    )
