#include "data/image.h"

#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string_view>
#include <vector>

#include "core/errors.h"
#include "core/rng.h"

namespace trialign {

namespace {

// Why `path` is no image file: absent, or something that exists but is not a file.
std::string not_a_file(const std::string& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (std::filesystem::is_directory(st)) return "is a folder, not an image file";
  if (std::filesystem::exists(st)) return "is not a regular file (a device, pipe or socket)";
  return "does not exist";
}

// A PNG's IHDR gives its size before anything is decoded (bytes 16-23, big-endian). A small
// file can declare a huge image (a "decompression bomb": 2.6 MB holding 30000 x 30000 pixels
// decodes to 2.7 GB, in every loader thread, every epoch).
constexpr int64_t kMaxImagePixels = int64_t{1} << 27;  // 128 Mi = 134M pixels, e.g. 11585 x 11585

std::string fmt_megabytes(double bytes) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(0);
  os << bytes / (1024.0 * 1024.0) << " MB";
  return os.str();
}

void check_png_size(const std::string& path, std::string_view bytes) {
  if (bytes.size() < 24 || bytes.substr(12, 4) != "IHDR") return;
  auto be32 = [&](size_t at) {
    int64_t v = 0;
    for (size_t k = 0; k < 4; ++k) v = (v << 8) | static_cast<unsigned char>(bytes[at + k]);
    return v;
  };
  const int64_t w = be32(16), h = be32(20);  // each < 2^32: compared by division, no overflow
  if (w > 0 && h > 0 && w > kMaxImagePixels / h)
    throw DataError("image '" + path + "' is " + std::to_string(w) + " x " + std::to_string(h) +
                    " pixels; images are resized to model.vision.image_size anyway, and decoding one this large takes " +
                    fmt_megabytes(3.0 * static_cast<double>(w) * static_cast<double>(h)) +
                    " per read: downscale it (the limit is " + std::to_string(kMaxImagePixels >> 20) +
                    " Mi pixels)");
}

}  // namespace

cv::Mat load_image_rgb(const std::string& path) {
  // A file that fails to decode becomes one DataError naming it; OpenCV's logged warnings about
  // the same file would only repeat it (some of its decoders still print to stderr themselves).
  static const bool quiet = [] {
    cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_ERROR);
    return true;
  }();
  (void)quiet;
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw DataError("image '" + path + "' " + not_a_file(path) + " (check data.image_root and the record's image path)");
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) throw DataError("image '" + path + "' cannot be read (" + ec.message() + ")");
  if (size == 0) throw DataError("image '" + path + "' is an empty file");
  std::vector<uchar> bytes(static_cast<size_t>(size));
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (!in || static_cast<uintmax_t>(in.gcount()) != size)
    throw DataError("image '" + path + "' cannot be read (unreadable, or it changed while being read)");
  // libpng prints its own "Read Error" to stderr before OpenCV returns an empty image for a PNG
  // cut short (a partial copy or download); recognised here, that is one message naming the file.
  static const std::string png_signature = "\x89PNG\r\n\x1a\n", iend = "IEND";
  const std::string_view view(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  // IEND's type and CRC are a PNG's last 8 bytes (a writer may append more after them).
  const size_t iend_at = view.rfind(iend);
  if (view.substr(0, 8) == png_signature && (iend_at == std::string_view::npos || iend_at + 8 > view.size()))
    throw DataError("image '" + path + "' is a truncated PNG (it ends before its IEND chunk); copy or export it again");
  if (view.substr(0, 8) == png_signature) check_png_size(path, view);
  cv::Mat bgr;
  try {
    bgr = cv::imdecode(bytes, cv::IMREAD_COLOR);
  } catch (const cv::Exception& e) {
    throw DataError("image '" + path + "' cannot be decoded: " + e.what());
  }
  if (bgr.empty()) throw DataError("image '" + path + "' is not a decodable image (corrupt or unsupported format)");
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return rgb;
}

cv::Mat resize_center_crop(const cv::Mat& rgb, int size) {
  const double scale = static_cast<double>(size) / std::min(rgb.cols, rgb.rows);
  cv::Mat resized = rgb;
  if (rgb.cols != size || rgb.rows != size) {
    const int w = std::max(size, static_cast<int>(std::lround(rgb.cols * scale)));
    const int h = std::max(size, static_cast<int>(std::lround(rgb.rows * scale)));
    cv::resize(rgb, resized, cv::Size(w, h), 0, 0, scale < 1 ? cv::INTER_AREA : cv::INTER_CUBIC);
  }
  const int x = (resized.cols - size) / 2, y = (resized.rows - size) / 2;
  return resized(cv::Rect(x, y, size, size)).clone();
}

cv::Mat random_resized_crop(const cv::Mat& rgb, int size, double scale_min, double scale_max,
                            double ratio_min, double ratio_max, uint64_t seed, cv::Rect* chosen) {
  Rng rng(seed);
  const double area = static_cast<double>(rgb.cols) * rgb.rows;
  const double log_lo = std::log(ratio_min), log_hi = std::log(ratio_max);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target = area * rng.uniform(scale_min, scale_max);
    const double ratio = std::exp(rng.uniform(log_lo, log_hi));
    const int w = static_cast<int>(std::lround(std::sqrt(target * ratio)));
    const int h = static_cast<int>(std::lround(std::sqrt(target / ratio)));
    if (w <= 0 || h <= 0 || w > rgb.cols || h > rgb.rows) continue;
    const int x = static_cast<int>(rng.below(static_cast<uint64_t>(rgb.cols - w + 1)));
    const int y = static_cast<int>(rng.below(static_cast<uint64_t>(rgb.rows - h + 1)));
    cv::Rect r(x, y, w, h);
    if (chosen) *chosen = r;
    cv::Mat out;
    cv::resize(rgb(r), out, cv::Size(size, size), 0, 0, cv::INTER_LINEAR);
    return out;
  }
  if (chosen) *chosen = cv::Rect(0, 0, rgb.cols, rgb.rows);
  return resize_center_crop(rgb, size);
}

torch::Tensor to_clip_tensor(const cv::Mat& rgb) {
  TORCH_CHECK(rgb.type() == CV_8UC3, "to_clip_tensor: expected an RGB uint8 image");
  cv::Mat cont = rgb.isContinuous() ? rgb : rgb.clone();
  auto t = torch::from_blob(cont.data, {cont.rows, cont.cols, 3}, torch::kUInt8)
               .permute({2, 0, 1})
               .to(torch::kFloat32)
               .div_(255.0);  // [3, H, W]; .to() copies, so the Mat may go away
  static const auto mean = torch::tensor({0.48145466f, 0.4578275f, 0.40821073f}).view({3, 1, 1});
  static const auto std = torch::tensor({0.26862954f, 0.26130258f, 0.27577711f}).view({3, 1, 1});
  return t.sub_(mean).div_(std).contiguous();
}

torch::Tensor image_transform(const cv::Mat& rgb, const DataConfig& cfg, bool train, uint64_t seed) {
  const auto& a = cfg.augment;
  if (train && a.random_resized_crop)
    return to_clip_tensor(random_resized_crop(rgb, cfg.image_size, a.scale_min, a.scale_max, a.ratio_min,
                                              a.ratio_max, seed));
  return to_clip_tensor(resize_center_crop(rgb, cfg.image_size));
}

std::string checked_image_path(const std::string& root, const std::string& image, const std::string& at) {
  const std::string path = (std::filesystem::path(root) / image).string();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw DataError(at + "image '" + path + "' " + not_a_file(path) + " (check data.image_root)");
  if (std::filesystem::file_size(path, ec) == 0 || !cv::haveImageReader(path))
    throw DataError(at + "image '" + path + "' is empty or not an image format OpenCV can decode");
  return path;
}

torch::Tensor load_sample_image(const std::string& path, const DataConfig& cfg, bool augment, uint64_t seed,
                                const std::string& at) {
  cv::Mat rgb;
  try {
    rgb = load_image_rgb(path);
  } catch (const DataError& e) {
    throw DataError(at + e.what());
  }
  return image_transform(rgb, cfg, augment, seed);
}

}  // namespace trialign
