//! The forward pass on the CUDA backend: the model's weights on the device (`weights`), decode steps for one or
//! many sequences (`decode`), and whole-prompt prefill (`prefill`). The KV cache and the logits stay in the
//! actors' memory (pinned or managed placement), bf16 and f32, written in place by the kernels.

mod decode;
mod prefill;
mod weights;

pub(crate) use weights::GpuModel;
