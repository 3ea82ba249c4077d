"""Every type of the library's public boundaries, in one place (jaxtyping shape annotations).

The test suite checks them at run time (jaxtyping's import hook with beartype, see
``tests/conftest.py``), so a shape error fails at the boundary that received it. Host arrays
(numpy) are accepted where a function takes data (images, labels), device arrays everywhere.
Callable types: ``EpsFn`` (diffusion model), ``LogitsFn`` (anything an attack attacks),
``PurifyFn`` (a purifier); the fold_in tags of every random draw are in :mod:`jaxrob._keys`.
"""

from collections.abc import Callable

import jax
import numpy as np
from jaxtyping import Float, Int, PRNGKeyArray
from jaxtyping import Key as _KeyArray

Array = jax.Array | np.ndarray  # a device array, or a host array where the function takes one
_Data = Array

Images = Float[_Data, "b h w c"]  # float32 NHWC in [0, 1] at public boundaries


class RowArray:
    """Base of the host array-likes that are not arrays and are read row by row
    (``x[rows]``, e.g. ``jaxrob.data.LazyImages``, decoded on first access): accepted, besides
    arrays, by the evaluations that read a dataset's rows chunk by chunk."""


DatasetImages = Images | RowArray  # what an evaluation over a whole dataset takes
Latents = Float[Array, "b h w c"]  # diffusion-space tensors (x_t), usually in about [-1, 1]
# an autoencoder's latent codes of images (b, h/f, w/f, c_z): own names, so that a function
# taking images and returning their codes is checked for the batch size only
LatentCodes = Float[Array, "b zh zw zc"]
Steps = Int[Array, " b"] | Float[Array, " b"] | Int[Array, ""] | int
Labels = Int[_Data, " b"]
Logits = Float[Array, "b k"]
PerExample = Float[Array, " b"]
PerExampleInt = Int[Array, " b"]  # an integer per example (e.g. the index of a kept restart)
Key = PRNGKeyArray  # one key
Keys = _KeyArray[Array, " b"]  # one key per example
AnyKey = Key | Keys  # either: purifiers and defended models take both

EpsFn = Callable[[Array, Array], Array]  # eps_fn(x_t, model_step) -> eps
LogitsFn = Callable[[Array, Array], Array]  # logits_fn(x, key) -> (B, K); the attacked thing
PurifyFn = Callable[[Array, Array], Array]  # purify(x, key) -> x_purified

__all__ = ["AnyKey", "Array", "DatasetImages", "EpsFn", "Images", "Key", "Keys", "Labels",
           "LatentCodes", "Latents", "Logits", "LogitsFn", "PerExample", "PerExampleInt",
           "PurifyFn", "RowArray", "Steps"]
