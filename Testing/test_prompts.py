"""The typed prompts: what each front end hands the pipeline, checked before any work."""

import pytest

from ARSegLib.prompts import EXCLUDE, INCLUDE, Prompt, PromptError, Refinement, exclude, include, refinement


def test_a_prompt_keeps_its_kind_and_point_and_round_trips():
    p = exclude((1, 2.5, -3))
    assert p.kind == EXCLUDE and p.point_ras == (1.0, 2.5, -3.0)
    assert Prompt.from_dict(p.to_dict()) == p
    r = refinement(include_points=[(0, 0, 0)], exclude_points=[(1, 1, 1)], lock_scales=3, from_sample=2)
    assert r.points(INCLUDE) == ((0.0, 0.0, 0.0),) and r.points(EXCLUDE) == ((1.0, 1.0, 1.0),)
    assert Refinement.from_dict(r.to_dict()) == r and not r.empty and Refinement().empty


@pytest.mark.parametrize("make, words", [
    (lambda: Prompt("maybe", (0, 0, 0)), "kind"),
    (lambda: include((0, 0)), "three"),
    (lambda: include((0, float("nan"), 0)), "finite"),
    (lambda: Refinement(lock_scales=-1), "lock_scales"),
    (lambda: Refinement(use_sample=0), "from 1"),
    (lambda: Refinement(from_sample=2), "lock_scales too"),
    (lambda: Refinement(prompts=(exclude((0, 0, 0)),), use_sample=1), "does not combine"),
    (lambda: Refinement(lock_scales=True), "whole number"),
    (lambda: Refinement(lock_scales=8).check_against(n_scales=8, n_samples=16), "below"),
    (lambda: Refinement(use_sample=17).check_against(n_scales=8, n_samples=16), "does not exist"),
])
def test_bad_prompts_are_refused_with_the_field_named(make, words):
    with pytest.raises(PromptError, match=words):
        make()
