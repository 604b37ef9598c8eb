// ffclip_edit: edit latents with a prompt through an ffclip artifact folder and write the images as a PPM.
#include <cstring>
#include <exception>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "ffclip_runtime.h"

namespace {

constexpr const char* kUsage =
    "usage: ffclip_edit ARTIFACTS LATENTS.npy TOKENS.npy OUT.ppm\n"
    "       ffclip_edit --synthesize ARTIFACTS LATENTS.npy OUT.ppm\n"
    "\n"
    "ARTIFACTS   folder written by ffclip-export --formats torchscript (manifest.json + torchscript/*.pt)\n"
    "LATENTS     float32 .npy, [B, L, 512] or [B, 512]\n"
    "TOKENS      int64 .npy of CLIP tokens, [1, 77] (one prompt for all latents) or [B, 77] (one per latent)\n"
    "OUT.ppm     binary PPM (P6): the B images side by side\n"
    "--synthesize  render the latents unedited (no tokens)\n";

int usage_error(const std::string& message) {
  std::cerr << "ffclip_edit: " << message << "; run ffclip_edit --help for usage\n";
  return 2;
}

int run(const std::vector<std::string>& args) {
  const bool synthesize_only = !args.empty() && args[0] == "--synthesize";
  const std::vector<std::string> paths(args.begin() + (synthesize_only ? 1 : 0), args.end());
  const size_t want = synthesize_only ? 3 : 4;
  for (const auto& a : paths)
    if (a.rfind("--", 0) == 0) return usage_error("unknown option " + a);
  if (paths.size() != want)
    return usage_error("expected " + std::to_string(want) + " arguments, got " + std::to_string(paths.size()));

  ffclip::Runtime runtime(paths[0]);
  const at::Tensor latents = ffclip::read_npy(paths[1]);
  if (!latents.is_floating_point())
    throw ffclip::Error(paths[1] + ": latents must be float32, found an integer array" +
                        "; save them with numpy.save(path, w.astype('float32'))");
  at::Tensor images;
  try {
    if (synthesize_only) {
      images = ffclip::to_uint8(runtime.synthesize(latents));
    } else {
      at::Tensor tokens = ffclip::read_npy(paths[2]);
      if (tokens.is_floating_point())
        throw ffclip::Error(paths[2] + ": tokens must be int64, found a float array" +
                            "; save CLIP tokenizer output with numpy.save(path, tokens.numpy())");
      if (tokens.dim() == 1) tokens = tokens.unsqueeze(0);
      images = runtime.edit(latents, tokens.to(at::kLong));
    }
  } catch (const ffclip::Error& e) {
    // the runtime names its inputs "latents: ..." and "tokens: ..."; name the files instead
    const std::string message = e.what();
    for (const auto& [name, path] : {std::pair{"latents: ", paths[1]}, std::pair{"tokens: ", paths[2]}})
      if (message.rfind(name, 0) == 0) throw ffclip::Error(path + ": " + message.substr(std::strlen(name)));
    throw;
  }
  ffclip::write_ppm(paths.back(), images);
  std::cout << "wrote " << paths.back() << " (" << images.size(0) << " image(s), " << images.size(2) << "x"
            << images.size(1) << ", " << runtime.device() << ")\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() == 1 && (args[0] == "-h" || args[0] == "--help")) {
    std::cout << kUsage;
    return 0;
  }
  try {
    return run(args);
  } catch (const ffclip::Error& e) {
    std::cerr << "ffclip_edit: " << e.what() << "\n";
    return 2;
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    std::cerr << "ffclip_edit: torch error: " << message.substr(0, message.find('\n')) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "ffclip_edit: " << e.what() << "\n";
    return 1;
  } catch (...) {
    std::cerr << "ffclip_edit: unknown error\n";
    return 1;
  }
}
