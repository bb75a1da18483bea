"""The run service (ARSegLib/runs.py): one check before any work, two backends with one interface, results applied
through mrml, and a refinement routed to pipeline.segment_click with the nodule's previous result (in this process
and across the worker protocol). The refinement's effect on the samples is pipeline.py's, tested there."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from ARSegLib import mrml, pipeline, runs, worker  # noqa: E402
from ARSegLib.pipeline import SegmentSettings  # noqa: E402
from ARSegLib.prompts import PromptError, Refinement, exclude, include  # noqa: E402


def _scene_with_volume(lung1):
    scene = mrml.new_scene()
    return scene, mrml.add_scalar_volume(scene, "lung1", lung1.array, lung1.ijk_to_ras)


def _node_count(scene):
    return scene.GetNumberOfNodes()


@pytest.fixture()
def disc(tiny):
    from arseg_volumes import DiscPredictor

    predictor, card = tiny
    return DiscPredictor(predictor.config), card


@pytest.fixture()
def refinements_recorded(monkeypatch):
    """pipeline.segment_click that records what a refinement brings (refinement, previous) and answers with the
    plain click: the refinement itself is pipeline.py's."""
    real, calls = pipeline.segment_click, []

    def recording(*args, refinement=None, previous=None, **kwargs):
        calls.append({"refinement": refinement, "previous": previous, "point": tuple(args[2])})
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "segment_click", recording)
    return calls


def test_several_points_are_all_checked_before_any_inference(lung1, disc):
    fake, card = disc
    service = runs.RunService(runs.LocalBackend(fake, card))
    scene, volume = _scene_with_volume(lung1)
    before = _node_count(scene)
    far = tuple(np.add(lung1.nodule_ras, (30.0, -15.0, 0.0)))
    with pytest.raises(pipeline.PointOutsideVolumeError):  # the second point is outside: nothing runs
        service.segment_node(volume, runs.clicks([lung1.nodule_ras, (0.0, 0.0, 900.0)]),
                             SegmentSettings(n_samples=4, half_height_mm=5))
    assert fake.calls == 0 and _node_count(scene) == before
    from ARSegLib.models import read_card

    with pytest.raises(pipeline.UnsupportedModeError):  # no point, a click-only card: refused, not guessed
        runs.RunService(runs.LocalBackend(fake, read_card("lidc-nodule"))).segment_node(volume)
    with pytest.raises(pipeline.SettingsError, match="n_samples"):
        service.segment_node(volume, runs.clicks([lung1.nodule_ras]), SegmentSettings(n_samples=0))
    assert fake.calls == 0 and _node_count(scene) == before

    nodes = service.segment_node(volume, runs.clicks([lung1.nodule_ras, far]),
                                 SegmentSettings(n_samples=4, half_height_mm=5))
    assert nodes.nodule_ids == ["Nodule_1", "Nodule_2"] and len(nodes.results) == 2
    assert [n.id for n in mrml.list_nodules(scene, volume)] == ["Nodule_1", "Nodule_2"]
    key = runs.volume_key_of(volume)
    assert service.memory.get(key, "Nodule_1").result is nodes.results[0]  # what a refinement starts from
    assert service.memory.get(key, "Nodule_2").result is nodes.results[1]


def test_requests_are_checked_once_with_clear_errors(lung1, disc):
    fake, card = disc
    service = runs.RunService(runs.LocalBackend(fake, card))
    scene, volume = _scene_with_volume(lung1)
    inside = include(lung1.nodule_ras)
    with pytest.raises(PromptError, match="include point"):
        service.check(service.request_for_node(volume, click=exclude(lung1.nodule_ras)))
    with pytest.raises(PromptError, match="needs the nodule"):
        service.check(service.request_for_node(volume, click=inside, refinement=Refinement(lock_scales=1)))
    with pytest.raises(PromptError, match="segment it"):  # nothing remembered of Nodule_1 yet
        service.check(service.request_for_node(volume, click=inside, nodule="Nodule_1",
                                               refinement=Refinement(lock_scales=1)))
    with pytest.raises(PromptError, match="whole-volume"):
        service.check(service.request_for_node(volume, nodule="Nodule_1", refinement=Refinement(lock_scales=1)))
    with pytest.raises(pipeline.VolumeError, match="does not hold"):
        service.check(runs.RunRequest(ijk_to_ras=lung1.ijk_to_ras, volume_shape=lung1.array.shape, click=inside))
    service.segment_node(volume, runs.clicks([lung1.nodule_ras]), SegmentSettings(n_samples=4, half_height_mm=5))
    calls = fake.calls
    n_scales = len(fake.config.autoencoder.scales)
    for bad, words in ((Refinement(lock_scales=n_scales), "below the model"), (Refinement(use_sample=5), "4 samples"),
                       (Refinement(prompts=(exclude((0.0, 0.0, 900.0)),)), "outside the volume")):
        with pytest.raises((PromptError, pipeline.PointOutsideVolumeError), match=words):
            service.refine(volume, "Nodule_1", bad)
    with pytest.raises(PromptError, match="Nodule_7"):
        service.refine(volume, "Nodule_7", Refinement(lock_scales=1))
    assert fake.calls == calls  # none of these ran the model


def test_the_local_backend_has_the_worker_run_interface(lung1, tiny):
    """poll() never blocks, progress in done_steps/total_steps, cancel stops at the next scale (RunCancelled)."""
    predictor, card = tiny
    service = runs.RunService(runs.LocalBackend(predictor, card))
    request = runs.RunRequest(ijk_to_ras=lung1.ijk_to_ras, volume=lung1.array, click=include(lung1.nodule_ras),
                              settings=SegmentSettings(n_samples=2, half_height_mm=5))
    seen = []
    result = runs.finish(service.start(request), progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1]  # it reached its last scale
    direct = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card,
                                    SegmentSettings(n_samples=2, half_height_mm=5))
    np.testing.assert_array_equal(result.sample_bits, direct.sample_bits)  # the same run as the pipeline's own
    run = service.start(request)
    run.cancel()
    assert run.wait(60) and run.cancelled and isinstance(run.error, runs.RunCancelled)
    with pytest.raises(runs.RunCancelled):
        runs.finish(run)


def test_a_refinement_goes_to_the_same_nodule_with_its_previous_result(lung1, disc, refinements_recorded):
    fake, card = disc
    service = runs.RunService(runs.LocalBackend(fake, card))
    scene, volume = _scene_with_volume(lung1)
    settings = SegmentSettings(n_samples=4, half_height_mm=5)
    not_this = exclude(np.add(lung1.nodule_ras, (2.0, 0.0, 0.0)))
    steps = [runs.NoduleSteps(include(lung1.nodule_ras), (Refinement(prompts=(not_this,)),))]
    nodes = service.segment_node(volume, steps, settings)
    click, refined = refinements_recorded
    assert click["refinement"] is None and refined["refinement"].prompts == (not_this,)
    assert refined["previous"] is nodes.results[0] and refined["point"] == pytest.approx(lung1.nodule_ras)
    assert nodes.nodule_ids == ["Nodule_1"] and nodes.nodule == "Nodule_1"  # refined, not a new nodule
    # the console's way: from what the service remembers of Nodule_1 (the refined result), its own settings
    again = service.refine(volume, "Nodule_1", Refinement(lock_scales=2, from_sample=3))
    assert refinements_recorded[-1]["previous"] is nodes.results[1]
    assert refinements_recorded[-1]["refinement"] == Refinement(lock_scales=2, from_sample=3)
    assert again.nodule_ids == ["Nodule_1"] and again.result.n_samples == 4
    service.memory.forget(runs.volume_key_of(volume), "Nodule_1")
    with pytest.raises(PromptError, match="segment it"):
        service.refine(volume, "Nodule_1", Refinement(lock_scales=1))


def test_the_worker_protocol_carries_typed_prompts_and_the_previous_result(lung1, tiny, tiny_model_card,
                                                                         monkeypatch, refinements_recorded):
    """Both ends of the "segment" message in this process: the client's arguments (plain dicts, unrounded; the
    previous result's arrays as files), pickled as the connection does, served by the worker's own op_segment."""
    predictor, card = tiny
    settings = SegmentSettings(n_samples=2, half_height_mm=5)
    previous = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card, settings)
    click = include(np.add(lung1.nodule_ras, (1e-4, 0.0, 0.0)))
    refinement = Refinement(prompts=(exclude(np.add(lung1.nodule_ras, (3.0, 0.0, 0.0))),), lock_scales=1)
    client = worker.InferenceClient(str(tiny_model_card), "cpu")
    client._folder = worker.ArrayFolder.create()
    sent = []
    monkeypatch.setattr(client, "alive", lambda: True)
    monkeypatch.setattr(client, "_submit", lambda op, args: sent.append((op, args)))
    try:
        with pytest.raises(TypeError, match="prompts.Prompt"):
            client.segment(lung1.array, lung1.ijk_to_ras, tuple(lung1.nodule_ras), settings)  # a bare point
        client.segment(lung1.array, lung1.ijk_to_ras, click, settings, volume_key="k", refinement=refinement,
                       previous=previous)
        op, args = sent[0]
        args = pickle.loads(pickle.dumps(args))
        assert op == "segment" and "point_ras" not in args
        assert args["click"] == {"kind": "include", "point_ras": list(click.point_ras)}  # exact, not rounded
        assert Refinement.from_dict(args["refinement"]) == refinement
        assert isinstance(args["previous"].sample_bits, worker.ArrayFile)  # large arrays cross as files

        class Connection:  # what the worker sends back meanwhile (its progress)
            def __init__(self):
                self.sent = []

            def send(self, message):
                self.sent.append(message)

        server = worker._Server(Connection(), str(tiny_model_card), "cpu")
        server.model = (predictor, card)
        out = worker.internalize(server.op_segment(1, args, threading.Event()))
    finally:
        client._folder.remove()
    call = refinements_recorded[-1]
    assert call["refinement"] == refinement and call["point"] == click.point_ras
    for name in ("sample_bits", "scale_bits", "consensus"):
        np.testing.assert_array_equal(getattr(call["previous"], name), getattr(previous, name))
    assert isinstance(out, pipeline.VolumeResult) and server.conn.sent[-1][0] == "progress"


def test_the_whole_volume_through_the_service_equals_the_pipeline(tiny):
    predictor, card = tiny  # its card lists both modes
    rng = np.random.default_rng(0)
    volume = rng.normal(-500, 300, (3, 40, 40)).astype(np.float32)
    m = np.diag([0.7, 0.7, 2.5, 1.0])
    settings = SegmentSettings(n_samples=2)
    service = runs.RunService(runs.LocalBackend(predictor, card))
    got = service.run(runs.RunRequest(ijk_to_ras=m, volume=volume, settings=settings))
    want = pipeline.segment_volume(volume, m, predictor, card, settings)
    np.testing.assert_array_equal(got.sample_bits, want.sample_bits)


def test_a_refinement_whose_click_found_nothing_is_not_applied_to_another_nodule(lung1, tiny, refinements_recorded):
    from arseg_volumes import DiscPredictor

    predictor, card = tiny
    scene, volume = _scene_with_volume(lung1)
    settings = SegmentSettings(n_samples=4, half_height_mm=5)
    runs.RunService(runs.LocalBackend(DiscPredictor(predictor.config), card)).segment_node(
        volume, runs.clicks([lung1.nodule_ras]), settings)
    before = mrml.list_nodules(scene, volume)
    nothing = runs.RunService(runs.LocalBackend(DiscPredictor(predictor.config, marking=0), card))
    steps = [runs.NoduleSteps(include(lung1.nodule_ras), (Refinement(lock_scales=1),))]
    nodes = nothing.segment_node(volume, steps, settings)
    assert any("kept as it was" in n for n in nodes.notices)
    assert any("refinement of the point" in n and "not applied" in n for n in nodes.notices)
    assert mrml.list_nodules(scene, volume) == before  # the nodule the click landed in is as it was


def test_a_refinement_point_off_the_nodule_grid_is_refused_before_any_run(lung1, disc, refinements_recorded):
    """Inside the volume but outside the nodule's grid: said by the service's check (the page shows it), where
    before the worker found it only once the run had started."""
    fake, card = disc
    service = runs.RunService(runs.LocalBackend(fake, card))
    scene, volume = _scene_with_volume(lung1)
    service.segment_node(volume, runs.clicks([lung1.nodule_ras]), SegmentSettings(n_samples=4, half_height_mm=5))
    far = exclude(np.add(lung1.nodule_ras, (0.0, 0.0, 20.0)))  # planes +-5 mm around the click
    request = service.refine_request(volume, "Nodule_1", Refinement(prompts=(far,)))
    assert request.nodule == "Nodule_1" and request.click.point_ras == pytest.approx(lung1.nodule_ras)
    n_calls, n_nodes = len(refinements_recorded), _node_count(scene)
    with pytest.raises(PromptError, match="outside this nodule's grid"):
        service.start(request)
    assert len(refinements_recorded) == n_calls and _node_count(scene) == n_nodes  # nothing ran, nothing changed
    near = exclude(np.add(lung1.nodule_ras, (2.0, 0.0, 0.0)))
    service.check(service.refine_request(volume, "Nodule_1", Refinement(prompts=(near,))))  # on the grid: fine
