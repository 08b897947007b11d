#include "data/image.h"

#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string_view>
#include <utility>
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

// An image's header gives its size before anything is decoded (declared_size below). A small
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

void refuse_huge(const std::string& path, int64_t w, int64_t h) {
  if (w > 0 && h > 0 && w > kMaxImagePixels / h)  // each < 2^32: compared by division, no overflow
    throw DataError("image '" + path + "' is " + std::to_string(w) + " x " + std::to_string(h) +
                    " pixels; images are resized to model.vision.image_size anyway, and decoding one this large takes " +
                    fmt_megabytes(3.0 * static_cast<double>(w) * static_cast<double>(h)) +
                    " per read: downscale it (the limit is " + std::to_string(kMaxImagePixels >> 20) +
                    " Mi pixels)");
}

int64_t be(std::string_view b, size_t at, size_t n) {
  int64_t v = 0;
  for (size_t k = 0; k < n; ++k) v = (v << 8) | static_cast<unsigned char>(b[at + k]);
  return v;
}

int64_t le(std::string_view b, size_t at, size_t n) {
  int64_t v = 0;
  for (size_t k = n; k-- > 0;) v = (v << 8) | static_cast<unsigned char>(b[at + k]);
  return v;
}

// The width and height an image file declares in its header, read without decoding, for the
// formats users' data comes in: PNG (IHDR, bytes 16-23, big-endian), JPEG (the first
// start-of-frame segment: height and width as 16-bit big-endian at 5 and 7 past its marker) and
// WebP (lossy "VP8 ": 14-bit little-endian at 26 and 28; lossless "VP8L": two 14-bit fields, minus
// one, from byte 21; extended "VP8X": 24-bit canvas size minus one at 24 and 27). {0, 0} when the
// header says nothing (the decoder then judges the file).
std::pair<int64_t, int64_t> declared_size(std::string_view b) {
  if (b.substr(0, 8) == "\x89PNG\r\n\x1a\n" && b.size() >= 24 && b.substr(12, 4) == "IHDR")
    return {be(b, 16, 4), be(b, 20, 4)};
  if (b.size() >= 4 && static_cast<unsigned char>(b[0]) == 0xFF && static_cast<unsigned char>(b[1]) == 0xD8) {
    // Walked as libjpeg reads it: bytes between segments that are not a marker are skipped (it
    // warns and decodes on), so a frame header placed after junk is found here too.
    size_t i = 2;
    while (i + 4 <= b.size()) {
      if (static_cast<unsigned char>(b[i]) != 0xFF) {
        ++i;
        continue;
      }
      const unsigned m = static_cast<unsigned char>(b[i + 1]);
      if (m == 0xFF) {  // fill byte before a marker
        ++i;
        continue;
      }
      if (m == 0x00 || m == 0x01 || (m >= 0xD0 && m <= 0xD8)) {  // no marker, or one without a length
        i += 2;
        continue;
      }
      if (m == 0xD9 || m == 0xDA) break;  // end of image, or the scan: no frame header before it
      const bool sof = m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
      if (sof && i + 9 <= b.size()) return {be(b, i + 7, 2), be(b, i + 5, 2)};
      i += 2 + static_cast<size_t>(std::max<int64_t>(2, be(b, i + 2, 2)));
    }
    return {0, 0};
  }
  if (b.size() >= 30 && b.substr(0, 4) == "RIFF" && b.substr(8, 4) == "WEBP") {
    const std::string_view chunk = b.substr(12, 4);
    if (chunk == "VP8 ") return {le(b, 26, 2) & 0x3FFF, le(b, 28, 2) & 0x3FFF};
    if (chunk == "VP8L") {
      const int64_t bits = le(b, 21, 4);
      return {(bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1};
    }
    if (chunk == "VP8X") return {le(b, 24, 3) + 1, le(b, 27, 3) + 1};
  }
  return {0, 0};
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
  const auto [declared_w, declared_h] = declared_size(view);
  refuse_huge(path, declared_w, declared_h);
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
