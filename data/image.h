// Image loading and transforms through OpenCV. Output tensors are [3, S, S] float32, RGB,
// normalised with CLIP's mean/std. Augmentation randomness comes from a seed the caller derives
// from (seed, epoch, sample index), so the same sample gets the same crop on every run.
#pragma once
#include <opencv2/core.hpp>
#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "core/run_config.h"

namespace trialign {

// Decodes PNG/JPEG/... to an RGB uint8 Mat. Throws DataError naming the path when the file is
// missing, empty or not a decodable image.
cv::Mat load_image_rgb(const std::string& path);

// Shortest side to `size`, then the central size x size square.
cv::Mat resize_center_crop(const cv::Mat& rgb, int size);

// RandomResizedCrop: a crop covering scale_min..scale_max of the area with aspect ratio in
// ratio_min..ratio_max (log-uniform), resized to size x size. Falls back to the centre crop
// after 10 tries, like torchvision.
cv::Mat random_resized_crop(const cv::Mat& rgb, int size, double scale_min, double scale_max,
                            double ratio_min, double ratio_max, uint64_t seed, cv::Rect* chosen = nullptr);

// uint8 RGB [S, S, 3] -> float [3, S, S], (x / 255 - mean) / std with CLIP's statistics.
torch::Tensor to_clip_tensor(const cv::Mat& rgb);

// The whole transform: augment when `train` and enabled, else resize + centre crop.
torch::Tensor image_transform(const cv::Mat& rgb, const DataConfig& cfg, bool train, uint64_t seed);

// `image` resolved against `root`; throws DataError "{at}image '...' does not exist (check
// data.image_root)" or "... is empty or not an image format OpenCV can decode". `at` names the
// record, e.g. "train.jsonl:3 (id x): ". Used when a dataset is built, so bad paths fail early.
std::string checked_image_path(const std::string& root, const std::string& image, const std::string& at);

// load_image_rgb + image_transform for a dataset sample; a decode failure names the record (`at`).
torch::Tensor load_sample_image(const std::string& path, const DataConfig& cfg, bool augment, uint64_t seed,
                                const std::string& at);

}  // namespace trialign
