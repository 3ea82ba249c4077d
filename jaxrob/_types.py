"""jaxtyping aliases shared by every public primitive."""

from jaxtyping import Array, Float, Int, PRNGKeyArray

Images = Float[Array, "b h w c"]  # float32 NHWC in [0, 1] at public boundaries
Latents = Float[Array, "b h w c"]  # diffusion-space tensors (x_t), usually in about [-1, 1]
Steps = Int[Array, " b"] | Float[Array, " b"]
Labels = Int[Array, " b"]
Logits = Float[Array, "b k"]
PerExample = Float[Array, " b"]
Key = PRNGKeyArray

__all__ = ["Array", "Images", "Key", "Labels", "Latents", "Logits", "PerExample", "Steps"]
