#include "ffclip_runtime.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <utility>
#include <vector>

#include <torch/cuda.h>
#include <torch/script.h>

namespace fs = std::filesystem;

namespace ffclip {
namespace {

constexpr const char* kStages[] = {"text_encoder", "mapper", "generator"};
constexpr const char* kFormat = "ffclip-artifacts";
constexpr int kFormatVersion = 1;
constexpr const char* kCheckInputs = "check the inputs' shapes and values";

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be opened for reading; check that it exists and is readable");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// ---- a small JSON reader, enough for manifest.json ----

struct Json {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Json> items;        // array elements, or object values
  std::vector<std::string> keys;  // object keys, parallel to `items`

  const Json* get(const std::string& key) const {
    if (kind != Kind::Object) return nullptr;
    for (size_t i = 0; i < keys.size(); ++i)
      if (keys[i] == key) return &items[i];
    return nullptr;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}

  Json parse() {
    Json value = parse_value(0);
    skip_space();
    if (i_ != s_.size()) fail("unexpected text after the top-level value");
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(what + " at byte " + std::to_string(i_));
  }

  void skip_space() {
    while (i_ < s_.size() && std::strchr(" \t\r\n", s_[i_]) != nullptr) ++i_;
  }

  bool consume(const char* literal) {
    const size_t n = std::strlen(literal);
    if (s_.compare(i_, n, literal) != 0) return false;
    i_ += n;
    return true;
  }

  Json parse_value(int depth) {
    if (depth > 64) fail("nesting too deep");
    skip_space();
    if (i_ >= s_.size()) fail("unexpected end of text");
    Json v;
    const char c = s_[i_];
    if (c == '{') {
      v.kind = Json::Kind::Object;
      ++i_;
      skip_space();
      if (consume("}")) return v;
      do {
        skip_space();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string key");
        v.keys.push_back(parse_string());
        skip_space();
        if (!consume(":")) fail("expected ':'");
        v.items.push_back(parse_value(depth + 1));
        skip_space();
      } while (consume(","));
      if (!consume("}")) fail("expected ',' or '}'");
    } else if (c == '[') {
      v.kind = Json::Kind::Array;
      ++i_;
      skip_space();
      if (consume("]")) return v;
      do {
        v.items.push_back(parse_value(depth + 1));
        skip_space();
      } while (consume(","));
      if (!consume("]")) fail("expected ',' or ']'");
    } else if (c == '"') {
      v.kind = Json::Kind::String;
      v.string = parse_string();
    } else if (consume("true")) {
      v.kind = Json::Kind::Bool;
      v.boolean = true;
    } else if (consume("false")) {
      v.kind = Json::Kind::Bool;
    } else if (consume("null")) {
      v.kind = Json::Kind::Null;
    } else {
      const char* begin = s_.c_str() + i_;
      char* end = nullptr;
      v.number = std::strtod(begin, &end);
      if (end == begin) fail("unexpected character");
      v.kind = Json::Kind::Number;
      i_ += static_cast<size_t>(end - begin);
    }
    return v;
  }

  std::string parse_string() {
    ++i_;  // opening quote
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) break;
      c = s_[i_++];
      switch (c) {
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          if (i_ + 4 > s_.size()) fail("truncated \\u escape");
          const unsigned code = static_cast<unsigned>(std::stoul(s_.substr(i_, 4), nullptr, 16));
          i_ += 4;
          // UTF-8 of a BMP code point; surrogate pairs do not occur in manifests
          if (code < 0x80) {
            out += static_cast<char>(code);
          } else if (code < 0x800) {
            out += static_cast<char>(0xC0 | (code >> 6));
            out += static_cast<char>(0x80 | (code & 0x3F));
          } else {
            out += static_cast<char>(0xE0 | (code >> 12));
            out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (code & 0x3F));
          }
          break;
        }
        default: out += c;  // \" \\ \/
      }
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;  // closing quote
    return out;
  }

  const std::string& s_;
  size_t i_ = 0;
};

// ---- SHA-256 (FIPS 180-4), to check artifact files against the manifest ----

class Sha256 {
 public:
  void update(const unsigned char* data, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      block_[fill_++] = data[i];
      if (fill_ == 64) {
        compress();
        bits_ += 512;
        fill_ = 0;
      }
    }
  }

  std::string hex() {
    const uint64_t total = bits_ + 8 * fill_;
    const unsigned char pad = 0x80, zero = 0;
    update(&pad, 1);
    while (fill_ != 56) update(&zero, 1);
    for (int i = 7; i >= 0; --i) {
      const auto byte = static_cast<unsigned char>(total >> (8 * i));
      update(&byte, 1);
    }
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (uint32_t word : h_)
      for (int i = 7; i >= 0; --i) out += digits[(word >> (4 * i)) & 0xF];
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void compress() {
    static constexpr std::array<uint32_t, 64> k = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    std::array<uint32_t, 64> w{};
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(block_[4 * i]) << 24 | uint32_t(block_[4 * i + 1]) << 16 | uint32_t(block_[4 * i + 2]) << 8 |
             uint32_t(block_[4 * i + 3]);
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    auto [a, b, c, d, e, f, g, h] = h_;
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    const std::array<uint32_t, 8> add = {a, b, c, d, e, f, g, h};
    for (int i = 0; i < 8; ++i) h_[i] += add[i];
  }

  std::array<uint32_t, 8> h_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::array<unsigned char, 64> block_{};
  size_t fill_ = 0;
  uint64_t bits_ = 0;
};

std::string sha256_hex(const std::string& bytes) {
  Sha256 hash;
  hash.update(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  return hash.hex();
}

// A manifest path names a file inside the folder: relative, no "..", and still inside once symlinks are resolved.
fs::path confined_path(const fs::path& folder, const std::string& rel, const std::string& where,
                       const std::string& fix) {
  const fs::path relative(rel);
  bool escapes = rel.empty() || relative.is_absolute() || relative.has_root_name() || relative.has_root_directory();
  for (const fs::path& part : relative) escapes = escapes || part == "..";
  const fs::path path = folder / relative;
  if (!escapes) {
    const fs::path root = fs::weakly_canonical(folder);
    const fs::path real = fs::weakly_canonical(path);
    const auto [end, at] = std::mismatch(root.begin(), root.end(), real.begin(), real.end());
    escapes = end != root.end();
  }
  if (escapes) throw Error(where + ": " + rel + " points outside the artifact folder" + fix);
  return path;
}

// ---- manifest helpers ----

const Json& require(const Json& parent, const std::string& key, Json::Kind kind, const std::string& where,
                    const std::string& fix) {
  const Json* v = parent.get(key);
  if (v == nullptr || v->kind != kind) throw Error(where + ": no valid \"" + key + "\" entry" + fix);
  return *v;
}

std::string shape_string(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// The line of a torch error message that says what happened: the first one, or for a TorchScript traceback the
// last one ("RuntimeError: ...").
std::string summary(const std::string& text) {
  if (text.find("Traceback of TorchScript") == std::string::npos) return text.substr(0, text.find('\n'));
  const size_t end = text.find_last_not_of("\n ");
  if (end == std::string::npos) return text;
  const size_t newline = text.rfind('\n', end);
  const size_t begin = newline == std::string::npos ? 0 : newline + 1;
  return text.substr(begin, end + 1 - begin);
}

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) return summary(c10_error->what_without_backtrace());
  return summary(e.what());
}

torch::Tensor run(torch::jit::script::Module& module, const fs::path& folder, const char* stage,
                  std::vector<torch::jit::IValue> inputs, const char* hint) {
  try {
    c10::InferenceMode guard;
    return module.forward(std::move(inputs)).toTensor();
  } catch (const std::exception& e) {
    throw Error(folder.string() + ": the " + stage + " stage failed (" + message_of(e) + "); " + hint);
  }
}

}  // namespace

// ---- Runtime ----

struct Runtime::Modules {
  torch::jit::script::Module text_encoder, mapper, generator;
};

Runtime::~Runtime() = default;
Runtime::Runtime(Runtime&&) noexcept = default;
Runtime& Runtime::operator=(Runtime&&) noexcept = default;

Runtime::Runtime(const fs::path& folder, bool verify) : folder_(folder), modules_(std::make_unique<Modules>()) {
  const fs::path manifest_path = folder / "manifest.json";
  const std::string fix = "; re-export with ffclip-export --formats torchscript --out " + folder.string();
  if (!fs::is_regular_file(manifest_path))
    throw Error(manifest_path.string() + ": not found; " + folder.string() +
                " is not an artifact folder (create one with ffclip-export --formats torchscript --out " +
                folder.string() + ")");
  Json manifest;
  try {
    manifest = JsonParser(read_text(manifest_path)).parse();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(manifest_path.string() + ": not valid JSON (" + e.what() + ")" + fix);
  }
  const std::string where = manifest_path.string();
  const Json* format = manifest.get("format");
  const Json* version = manifest.get("format_version");
  if (format == nullptr || format->string != kFormat || version == nullptr || version->number != kFormatVersion)
    throw Error(where + ": not an " + kFormat + " v" + std::to_string(kFormatVersion) + " manifest" + fix);

  const Json& model = require(manifest, "model", Json::Kind::Object, where, fix);
  auto dim = [&](const char* key) {
    const auto n = static_cast<int64_t>(require(model, key, Json::Kind::Number, where + " model", fix).number);
    if (n <= 0) throw Error(where + ": model." + key + " must be positive" + fix);
    return n;
  };
  model_ = {dim("num_ws"), dim("embed_dim"), dim("resolution"), dim("context_length")};

  const Json& files = require(manifest, "files", Json::Kind::Object, where, fix);
  const Json& stages = require(manifest, "stages", Json::Kind::Object, where, fix);
  std::string device_type;
  std::vector<fs::path> paths;
  std::vector<std::string> contents;
  for (const char* stage : kStages) {
    const std::string stage_where = where + " stages." + stage;
    const Json& entry = require(stages, stage, Json::Kind::Object, where + " stages", fix);
    const Json* rel = require(entry, "files", Json::Kind::Object, stage_where, fix).get("torchscript");
    if (rel == nullptr || rel->kind != Json::Kind::String)
      throw Error(folder.string() + ": no torchscript artifact for the " + stage +
                  " stage; re-export with ffclip-export --formats torchscript --out " + folder.string());
    const fs::path path = confined_path(folder, rel->string, stage_where, fix);
    const Json* digest = files.get(rel->string);
    if (digest == nullptr || digest->kind != Json::Kind::String)
      throw Error(where + ": " + rel->string + " is not listed under \"files\"" + fix);
    if (!fs::is_regular_file(path)) throw Error(path.string() + ": missing from the artifact folder" + fix);
    // read once: the bytes that are hashed are the bytes that are loaded
    std::string bytes = read_text(path);
    if (verify && sha256_hex(bytes) != digest->string)
      throw Error(path.string() + ": changed since export (sha256 differs from manifest.json)" + fix);

    std::string traced_on = "cpu";
    if (const Json* ts = entry.get("torchscript"); ts != nullptr)
      if (const Json* d = ts->get("device"); d != nullptr && d->kind == Json::Kind::String) traced_on = d->string;
    traced_on = traced_on.substr(0, traced_on.find(':'));
    if (!device_type.empty() && traced_on != device_type)
      throw Error(where + ": stages were traced on different devices (" + device_type + ", " + traced_on + ")" + fix);
    device_type = traced_on;
    paths.push_back(path);
    contents.push_back(std::move(bytes));
  }

  if (device_type == "cuda") {
    if (!torch::cuda::is_available())
      throw Error(folder.string() + ": traced on cuda, but no CUDA device is available here; run on a GPU machine or "
                  "re-export with ffclip-export --device cpu --formats torchscript --out " + folder.string());
    device_ = torch::Device(torch::kCUDA, 0);
  } else if (device_type != "cpu") {
    throw Error(where + ": traced on unsupported device '" + device_type + "'" + fix);
  }

  torch::jit::script::Module* modules[] = {&modules_->text_encoder, &modules_->mapper, &modules_->generator};
  for (size_t i = 0; i < paths.size(); ++i) {
    try {
      std::istringstream in(contents[i]);
      *modules[i] = torch::jit::load(in, device_);
      modules[i]->eval();
    } catch (const std::exception& e) {
      throw Error(paths[i].string() + ": not a loadable TorchScript module (" + message_of(e) + ")" + fix);
    }
  }
}

torch::Tensor Runtime::check_latents(const torch::Tensor& w) const {
  const int64_t L = model_.num_ws, D = model_.embed_dim;
  const std::string want = "expected float latents [B, " + std::to_string(L) + ", " + std::to_string(D) + "] or [B, " +
                           std::to_string(D) + "]";
  if (!w.defined() || !w.is_floating_point()) throw Error("latents: " + want + ", got a non-float tensor");
  torch::Tensor x = w;
  if (x.dim() == 2 && x.size(1) == D) x = x.unsqueeze(1).expand({-1, L, -1});
  if (x.dim() != 3 || x.size(1) != L || x.size(2) != D) throw Error("latents: " + want + ", got " + shape_string(w));
  if (x.size(0) == 0) throw Error("latents: no latents (batch size 0); give at least one");
  if (!torch::isfinite(x).all().item<bool>()) throw Error("latents: contains NaN or Inf values; give finite latents");
  return x.to(device_, torch::kFloat32).contiguous();
}

torch::Tensor Runtime::encode(const torch::Tensor& tokens) {
  const int64_t n = model_.context_length;
  const bool ok = tokens.defined() && !tokens.is_floating_point() && tokens.dim() == 2 && tokens.size(1) == n;
  if (!ok || tokens.size(0) == 0)
    throw Error("tokens: expected int64 CLIP tokens [B, " + std::to_string(n) + "] with B >= 1, got " +
                (tokens.defined() ? shape_string(tokens) : std::string("nothing")) +
                "; tokenize prompts with CLIP's tokenizer");
  if (tokens.min().item<int64_t>() < 0)
    throw Error("tokens: negative token ids; tokenize prompts with CLIP's tokenizer");
  return run(modules_->text_encoder, folder_, "text_encoder", {tokens.to(device_, torch::kInt64).contiguous()},
             "check that the tokens come from CLIP's tokenizer (ids within its vocabulary)");
}

torch::Tensor Runtime::modulate(const torch::Tensor& w, const torch::Tensor& embedding) {
  const torch::Tensor x = check_latents(w);
  const int64_t B = x.size(0), D = model_.embed_dim;
  if (!embedding.defined() || !embedding.is_floating_point())
    throw Error("embeddings: expected float text embeddings [B, " + std::to_string(D) + "]");
  torch::Tensor e = embedding;
  if (e.dim() == 1 || (e.dim() == 2 && e.size(0) == 1)) e = e.reshape({1, -1}).expand({B, -1});
  if (e.dim() != 2 || e.size(1) != D)
    throw Error("embeddings: expected [B, " + std::to_string(D) + "], got " + shape_string(embedding));
  if (e.size(0) != B)
    throw Error("embeddings: " + std::to_string(e.size(0)) + " rows for " + std::to_string(B) +
                " latents; give one per latent or one for all");
  if (!torch::isfinite(e).all().item<bool>())
    throw Error("embeddings: contains NaN or Inf values; give finite embeddings");
  return run(modules_->mapper, folder_, "mapper", {x, e.to(device_, torch::kFloat32).contiguous()}, kCheckInputs);
}

torch::Tensor Runtime::synthesize(const torch::Tensor& w) {
  return run(modules_->generator, folder_, "generator", {check_latents(w)}, kCheckInputs);
}

torch::Tensor Runtime::edit(const torch::Tensor& w, const torch::Tensor& tokens) {
  const torch::Tensor x = check_latents(w);
  if (tokens.defined() && tokens.dim() == 2 && tokens.size(0) != 1 && tokens.size(0) != x.size(0))
    throw Error("tokens: " + std::to_string(tokens.size(0)) + " prompts for " + std::to_string(x.size(0)) +
                " latents; give one prompt, or one per latent");
  return to_uint8(synthesize(modulate(x, encode(tokens))));
}

torch::Tensor to_uint8(const torch::Tensor& images) {
  const torch::Tensor x = (images.detach().to(torch::kFloat32).clamp(-1, 1) + 1) * 127.5;
  return x.round().to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous().cpu();
}

// ---- files ----

torch::Tensor read_npy(const fs::path& path) {
  const std::string p = path.string();
  const std::string fix = "; write it with numpy.save (little-endian, C order)";
  const std::string data = read_text(path);
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY") != 0) throw Error(p + ": not a .npy file" + fix);
  const int major = static_cast<unsigned char>(data[6]);
  size_t header_len = 0, offset = 0;
  auto byte = [&](size_t i) { return static_cast<size_t>(static_cast<unsigned char>(data[i])); };
  if (major == 1) {
    header_len = byte(8) | byte(9) << 8, offset = 10;
  } else if (major == 2 || major == 3) {
    if (data.size() < 12) throw Error(p + ": truncated .npy header" + fix);
    header_len = byte(8) | byte(9) << 8 | byte(10) << 16 | byte(11) << 24, offset = 12;
  } else {
    throw Error(p + ": unsupported .npy version " + std::to_string(major) + fix);
  }
  if (data.size() < offset + header_len) throw Error(p + ": truncated .npy header" + fix);
  const std::string header = data.substr(offset, header_len);
  offset += header_len;

  auto value_of = [&](const std::string& key) -> std::string {
    const size_t k = header.find("'" + key + "'");
    if (k == std::string::npos) throw Error(p + ": .npy header has no '" + key + "'" + fix);
    size_t v = header.find(':', k);
    if (v == std::string::npos) throw Error(p + ": malformed .npy header" + fix);
    ++v;
    while (v < header.size() && header[v] == ' ') ++v;
    return header.substr(v);
  };
  std::string descr = value_of("descr");
  if (descr.empty() || (descr[0] != '\'' && descr[0] != '"')) throw Error(p + ": malformed .npy dtype" + fix);
  descr = descr.substr(1, descr.find(descr[0], 1) - 1);
  if (value_of("fortran_order").rfind("False", 0) != 0) throw Error(p + ": Fortran-ordered arrays are not read" + fix);
  const std::string shape_text = value_of("shape");
  if (shape_text.empty() || shape_text[0] != '(') throw Error(p + ": malformed .npy shape" + fix);
  std::vector<int64_t> shape;
  for (size_t i = 1; i < shape_text.size() && shape_text[i] != ')';) {
    if (std::isdigit(static_cast<unsigned char>(shape_text[i]))) {
      size_t used = 0;
      shape.push_back(std::stoll(shape_text.substr(i), &used));
      i += used;
    } else {
      ++i;
    }
  }

  static const std::vector<std::pair<std::string, torch::ScalarType>> kinds = {
      {"<f4", torch::kFloat32}, {"<f8", torch::kFloat64}, {"<i4", torch::kInt32}, {"<i8", torch::kInt64}};
  const auto kind = std::find_if(kinds.begin(), kinds.end(), [&](const auto& k) { return k.first == descr; });
  if (kind == kinds.end())
    throw Error(p + ": dtype '" + descr + "' is not read; use float32 latents or int64 tokens" + fix);
  torch::Tensor out = torch::empty(shape, torch::TensorOptions().dtype(kind->second));
  const size_t bytes = static_cast<size_t>(out.nbytes());
  if (data.size() - offset != bytes)
    throw Error(p + ": holds " + std::to_string(data.size() - offset) + " data bytes, its header promises " +
                std::to_string(bytes) + fix);
  std::memcpy(out.data_ptr(), data.data() + offset, bytes);
  return out;
}

void write_ppm(const fs::path& path, const torch::Tensor& images) {
  if (!images.defined() || images.scalar_type() != torch::kUInt8 || images.dim() != 4 || images.size(3) != 3 ||
      images.size(0) == 0)
    throw Error(path.string() + ": write_ppm needs uint8 images [B, H, W, 3]");
  const torch::Tensor x = images.cpu().contiguous();
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2);
  const fs::path tmp = path.string() + ".part";
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) throw Error(path.string() + ": cannot be written; check that its folder exists and is writable");
    out << "P6\n" << B * W << " " << H << "\n255\n";
    const auto* pixels = x.data_ptr<uint8_t>();
    for (int64_t y = 0; y < H; ++y)
      for (int64_t b = 0; b < B; ++b)
        out.write(reinterpret_cast<const char*>(pixels + ((b * H + y) * W) * 3), static_cast<std::streamsize>(W * 3));
    if (!out.flush()) throw Error(path.string() + ": write failed; check free disk space");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw Error(path.string() + ": cannot be written (" + ec.message() + ")");
  }
}

}  // namespace ffclip
