// ffclip C++ runtime: serves FFCLIP edits from an artifact folder written by `ffclip-export --formats torchscript`.
//
// The folder holds manifest.json and torchscript/{text_encoder,mapper,generator}.pt. The three TorchScript
// modules run on the device type they were traced on (the manifest records it): CPU artifacts serve the CPU,
// CUDA artifacts serve CUDA.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>

// Only the tensor type: programs that include this header compile in seconds, not the half minute torch/script.h takes.
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace ffclip {

// A one-line message naming what went wrong, where, and what to do about it.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Model facts from the manifest's "model" entry.
struct ModelInfo {
  int64_t num_ws = 0;          // L, the number of w vectors
  int64_t embed_dim = 0;       // D, the width of w and of the text embedding
  int64_t resolution = 0;      // R, images are R x R
  int64_t context_length = 0;  // tokens per prompt (77 for CLIP)
};

class Runtime {
 public:
  // Open `folder`: read manifest.json, check that it lists the three TorchScript files (and, with `verify`, that
  // their sha256 matches), then load them. Throws ffclip::Error.
  explicit Runtime(const std::filesystem::path& folder, bool verify = true);
  ~Runtime();
  Runtime(Runtime&&) noexcept;
  Runtime& operator=(Runtime&&) noexcept;

  const ModelInfo& model() const { return model_; }
  const c10::Device& device() const { return device_; }
  const std::filesystem::path& folder() const { return folder_; }

  // int64 tokens [B, context_length] -> float32 raw CLIP text embeddings [B, D].
  at::Tensor encode(const at::Tensor& tokens);
  // float w [B, L, D] (or [B, D], broadcast to every layer) and embeddings [B, D] (or [D] / [1, D], shared by
  // all rows) -> edited float32 w' [B, L, D].
  at::Tensor modulate(const at::Tensor& w, const at::Tensor& embedding);
  // float w [B, L, D] (or [B, D]) -> float32 images [B, 3, R, R], roughly in [-1, 1].
  at::Tensor synthesize(const at::Tensor& w);
  // The whole edit: tokens hold one prompt for every latent ([1, context_length]) or one per latent.
  // Returns uint8 images [B, R, R, 3] (HWC) on the CPU.
  at::Tensor edit(const at::Tensor& w, const at::Tensor& tokens);

 private:
  struct Modules;  // the three TorchScript modules
  at::Tensor check_latents(const at::Tensor& w) const;

  std::filesystem::path folder_;
  ModelInfo model_;
  c10::Device device_{c10::kCPU};
  std::unique_ptr<Modules> modules_;
};

// Float images [B, 3, R, R] in [-1, 1] -> uint8 [B, R, R, 3] on the CPU (clamped, rounded), as ffclip.imaging.to_uint8.
at::Tensor to_uint8(const at::Tensor& images);

// Read a .npy file (little-endian float32, float64, int32 or int64, C order) into a CPU tensor. Throws ffclip::Error.
at::Tensor read_npy(const std::filesystem::path& path);

// Write uint8 images [B, R, R, 3] as one binary PPM (P6), the images side by side. Throws ffclip::Error.
void write_ppm(const std::filesystem::path& path, const at::Tensor& images);

}  // namespace ffclip
