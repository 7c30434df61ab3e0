"""8 clients at once, each with its own image and vocabulary, each gets its own answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gradio_client import handle_file
from PIL import Image

from app.inference import load_model
from tests.demo_helpers import client, served, tiny_dirs, write_photo

VOCABULARIES = [[f"thing{i}-{j}" for j in range(2 + i % 4)] for i in range(8)]


def test_eight_parallel_clients_get_their_own_results(tmp_path):
    _, model_dir = tiny_dirs(tmp_path)
    sizes = [(48 + 8 * i, 64 + 16 * i) for i in range(8)]  # (h, w): a different size per client
    photos = [write_photo(tmp_path / f"p{i}.png", h, w, seed=i) for i, (h, w) in enumerate(sizes)]

    with served(load_model(str(model_dir))) as url:

        def run(i: int) -> tuple[int, list]:
            c = client(url)
            first = c.predict(handle_file(str(photos[i])), ", ".join(VOCABULARIES[i]), "sinkhorn",
                              0.5, True, 0.5, api_name="/segment")  # fmt: skip
            again = c.predict("softmax", i / 8, True, 0.5, True, api_name="/rerender")
            return i, [first, again]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, range(8)))

    for i, (first, again) in results:
        names = VOCABULARIES[i]
        h, w = sizes[i]
        for overlay, legend, files, info, *_ in (first, again):
            assert [k["name"] for k in info["classes"]] == names
            assert info["image_size"] == [w, h]
            assert all(name in legend for name in names)
            assert Image.open(overlay).size == (w, h)
            labels = np.array(Image.open(next(f for f in files if f.endswith(".png"))))
            assert labels.shape == (h, w) and labels.max() < len(names)
        assert again[3]["lam"] == i / 8 and again[3]["attention"] == "softmax"
