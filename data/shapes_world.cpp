#include "data/shapes_world.h"
#include "data/shapes_negatives.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <stdexcept>
#include <utility>

namespace trialign::shapes {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------
// Vocabulary tables. Colours are stored as RGB; render() converts to OpenCV's BGR.
// ---------------------------------------------------------------------------------------------
struct ColourEntry {
  const char* name;
  unsigned char r, g, b;
};
// Hues spread around the wheel plus white; the closest pair (yellow/orange) is ~90 apart in RGB.
const ColourEntry kColours[] = {
    {"red", 220, 40, 40},     {"green", 40, 190, 60},   {"blue", 50, 90, 230},
    {"yellow", 235, 220, 50}, {"purple", 150, 60, 200}, {"orange", 245, 140, 30},
    {"cyan", 40, 210, 220},   {"white", 245, 245, 245},
};
const unsigned char kBackground[3] = {30, 30, 30};

struct SizeEntry {
  const char* name;
  double fraction;  // double so shapes_world.json records 0.09, not 0.0900000036
};
const SizeEntry kSizes[] = {{"small", 0.09}, {"large", 0.16}};

constexpr int kMinImageSize = 16;
constexpr int kTriesPerObject = 100;  // position draws per object before restarting the scene
constexpr int kSceneAttempts = 200;   // full restarts (new attributes + positions) per count
constexpr float kEdgePad = 1.0f;      // px between a bounding circle and the image border

std::string join(const std::vector<std::string>& v, const char* sep = ", ") {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += sep;
    out += v[i];
  }
  return out;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

// Minimum gap between two bounding circles, in px.
float margin_px(int image_size) { return std::max(2.0f, 0.03f * static_cast<float>(image_size)); }

float quantise_quarter(float v) { return std::round(v * 4.0f) / 4.0f; }

// Grid-packing lower bound on how many objects of bounding radius r fit without overlap:
// centres live in a square of side w and must be d = 2r + margin apart.
int placement_capacity(float r, int image_size) {
  const float w = static_cast<float>(image_size) - 1.0f - 2.0f * (r + kEdgePad);
  if (w < 0) return 0;
  const float d = 2.0f * r + margin_px(image_size);
  const int per_side = static_cast<int>(std::floor(w / d)) + 1;
  return per_side * per_side;
}

void check_vocab(const char* option, const std::vector<std::string>& given,
                 const std::vector<std::string>& known) {
  if (given.empty())
    throw std::invalid_argument(std::string("GeneratorOptions.") + option +
                                " is empty; list at least one of: " + join(known));
  for (size_t i = 0; i < given.size(); ++i) {
    if (!contains(known, given[i]))
      throw std::invalid_argument(std::string("GeneratorOptions.") + option + ": unknown value '" +
                                  given[i] + "'; known values are: " + join(known));
    for (size_t k = 0; k < i; ++k)
      if (given[k] == given[i])
        throw std::invalid_argument(std::string("GeneratorOptions.") + option + ": '" + given[i] +
                                    "' is listed twice; list each value once");
  }
}

// Does object `a` overlap `b` (bounding circles closer than the margin)?
bool too_close(const Object& a, const Object& b, float margin) {
  const double dx = static_cast<double>(a.cx) - b.cx;
  const double dy = static_cast<double>(a.cy) - b.cy;
  const double need = static_cast<double>(a.radius) + b.radius + margin;
  return dx * dx + dy * dy < need * need;
}

// Picks n distinct (shape, colour, size) triples uniformly among the unused ones.
std::vector<Object> sample_attributes(const GeneratorOptions& opts, int n, Rng& rng) {
  const size_t ns = opts.shapes.size(), nc = opts.colours.size(), nz = opts.sizes.size();
  std::vector<size_t> free_triples(ns * nc * nz);
  std::iota(free_triples.begin(), free_triples.end(), size_t{0});
  std::vector<Object> objects;
  objects.reserve(static_cast<size_t>(n));
  for (int k = 0; k < n; ++k) {
    const auto pick =
        static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(free_triples.size()) - 1));
    const size_t t = free_triples[pick];
    free_triples.erase(free_triples.begin() + static_cast<std::ptrdiff_t>(pick));
    Object o;
    o.shape = opts.shapes[t / (nc * nz)];
    o.colour = opts.colours[(t / nz) % nc];
    o.size = opts.sizes[t % nz];
    o.radius = size_radius_px(o.size, opts.image_size);
    objects.push_back(std::move(o));
  }
  return objects;
}

// Places objects (largest first) by rejection sampling on a 1/4-pixel grid; false if some
// object found no free spot within kTriesPerObject draws.
bool place_objects(std::vector<Object>& objects, int image_size, Rng& rng) {
  std::vector<size_t> order(objects.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return objects[a].radius > objects[b].radius; });
  const float margin = margin_px(image_size);
  std::vector<size_t> placed;
  for (size_t idx : order) {
    Object& o = objects[idx];
    const float lo = o.radius + kEdgePad;
    const float hi = static_cast<float>(image_size) - 1.0f - o.radius - kEdgePad;
    const auto qlo = static_cast<int64_t>(std::ceil(lo * 4.0f));
    const auto qhi = static_cast<int64_t>(std::floor(hi * 4.0f));
    if (qlo > qhi) return false;
    bool ok = false;
    for (int t = 0; t < kTriesPerObject && !ok; ++t) {
      o.cx = static_cast<float>(rng.uniform_int(qlo, qhi)) / 4.0f;
      o.cy = static_cast<float>(rng.uniform_int(qlo, qhi)) / 4.0f;
      ok = std::none_of(placed.begin(), placed.end(),
                        [&](size_t p) { return too_close(o, objects[p], margin); });
    }
    if (!ok) return false;
    placed.push_back(idx);
  }
  return true;
}

// Unit-radius outlines (y down, centred on the origin). Hard-coded constants instead of
// sin/cos so the vertices cannot differ between libm versions.
using Outline = std::vector<std::pair<float, float>>;
const Outline& outline_of(const std::string& shape) {
  static const std::map<std::string, Outline> outlines = [] {
    std::map<std::string, Outline> m;
    const float h = 0.70710678f;  // square corners on the bounding circle
    m["square"] = {{-h, -h}, {h, -h}, {h, h}, {-h, h}};
    m["diamond"] = {
        {0.f, -1.f}, {0.65f, 0.f}, {0.f, 1.f}, {-0.65f, 0.f}};  // a rhombus, not a square
    m["triangle"] = {{0.f, -1.f}, {0.8660254f, 0.5f}, {-0.8660254f, 0.5f}};  // centroid at origin
    const float a = 0.3f, b = 0.95f;  // cross: arm half-width, arm length
    m["cross"] = {{-a, -b}, {a, -b}, {a, -a}, {b, -a}, {b, a},   {a, a},
                  {a, b},   {-a, b}, {-a, a}, {-b, a}, {-b, -a}, {-a, -a}};
    // Five-pointed star: outer points at -90 + 72k degrees, inner at -54 + 72k, ratio 0.45.
    const float c18 = 0.95105652f, s18 = 0.30901699f, c54 = 0.58778525f, s54 = 0.80901699f;
    const float in = 0.45f;
    m["star"] = {{0.f, -1.f},  {in * c54, -in * s54},
                 {c18, -s18},  {in * c18, in * s18},
                 {c54, s54},   {0.f, in},
                 {-c54, s54},  {-in * c18, in * s18},
                 {-c18, -s18}, {-in * c54, -in * s54}};
    return m;
  }();
  const auto it = outlines.find(shape);
  if (it == outlines.end())
    throw std::invalid_argument("render: unknown shape '" + shape +
                                "'; known shapes are: " + join(all_shapes()));
  return it->second;
}

constexpr int kShift = 2;  // OpenCV sub-pixel bits: coordinates in 1/4 px
int to_fixed(double v) { return static_cast<int>(std::lround(v * (1 << kShift))); }

// ---------------------------------------------------------------------------------------------
// JSON field access with errors that name the field.
// ---------------------------------------------------------------------------------------------
const json& field(const json& j, const char* key, const std::string& where) {
  if (!j.is_object()) throw std::invalid_argument("scene JSON: '" + where + "' must be an object");
  const auto it = j.find(key);
  if (it == j.end())
    throw std::invalid_argument("scene JSON: missing field '" + where + "." + key + "'");
  return *it;
}

std::string string_field(const json& j, const char* key, const std::string& where) {
  const json& v = field(j, key, where);
  if (!v.is_string())
    throw std::invalid_argument("scene JSON: field '" + where + "." + key + "' must be a string");
  return v.get<std::string>();
}

float number_field(const json& j, const char* key, const std::string& where) {
  const json& v = field(j, key, where);
  if (!v.is_number())
    throw std::invalid_argument("scene JSON: field '" + where + "." + key + "' must be a number");
  return v.get<float>();
}

int int_field(const json& j, const char* key, const std::string& where) {
  const json& v = field(j, key, where);
  if (!v.is_number_integer())
    throw std::invalid_argument("scene JSON: field '" + where + "." + key + "' must be an integer");
  return v.get<int>();
}

const json& array_field(const json& j, const char* key, const std::string& where) {
  const json& v = field(j, key, where);
  if (!v.is_array())
    throw std::invalid_argument("scene JSON: field '" + where + "." + key + "' must be an array");
  return v;
}

std::string padded_index(int64_t index) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%06lld", static_cast<long long>(index));
  return buf;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Equality
// ---------------------------------------------------------------------------------------------
bool operator==(const Object& a, const Object& b) {
  return a.shape == b.shape && a.colour == b.colour && a.size == b.size && a.cx == b.cx &&
         a.cy == b.cy && a.radius == b.radius;
}
bool operator!=(const Object& a, const Object& b) { return !(a == b); }
bool operator==(const Relation& a, const Relation& b) {
  return a.subject == b.subject && a.object == b.object && a.predicate == b.predicate;
}
bool operator!=(const Relation& a, const Relation& b) { return !(a == b); }
bool operator==(const Scene& a, const Scene& b) {
  return a.id == b.id && a.objects == b.objects && a.relations == b.relations;
}
bool operator!=(const Scene& a, const Scene& b) { return !(a == b); }

// ---------------------------------------------------------------------------------------------
// Vocabulary
// ---------------------------------------------------------------------------------------------
const std::vector<std::string>& all_shapes() {
  static const std::vector<std::string> v = {"circle", "square",  "triangle",
                                             "star",   "diamond", "cross"};
  return v;
}

const std::vector<std::string>& all_colours() {
  static const std::vector<std::string> v = [] {
    std::vector<std::string> out;
    for (const auto& c : kColours) out.emplace_back(c.name);
    return out;
  }();
  return v;
}

const std::vector<std::string>& all_sizes() {
  static const std::vector<std::string> v = [] {
    std::vector<std::string> out;
    for (const auto& s : kSizes) out.emplace_back(s.name);
    return out;
  }();
  return v;
}

cv::Vec3b colour_rgb(const std::string& colour) {
  for (const auto& c : kColours)
    if (colour == c.name) return {c.r, c.g, c.b};
  throw std::invalid_argument("unknown colour '" + colour +
                              "'; known colours are: " + join(all_colours()));
}

cv::Vec3b background_rgb() { return {kBackground[0], kBackground[1], kBackground[2]}; }

float size_fraction(const std::string& size) {
  for (const auto& s : kSizes)
    if (size == s.name) return static_cast<float>(s.fraction);
  throw std::invalid_argument("unknown size '" + size + "'; known sizes are: " + join(all_sizes()));
}

float size_radius_px(const std::string& size, int image_size) {
  return quantise_quarter(size_fraction(size) * static_cast<float>(image_size));
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------
void validate(const GeneratorOptions& opts) {
  if (opts.image_size < kMinImageSize)
    throw std::invalid_argument("GeneratorOptions.image_size = " + std::to_string(opts.image_size) +
                                " is too small; use at least " + std::to_string(kMinImageSize) +
                                " so small shapes stay recognisable");
  if (opts.image_size > 8192)
    throw std::invalid_argument("GeneratorOptions.image_size = " + std::to_string(opts.image_size) +
                                " is too large; use at most 8192");
  if (opts.min_objects < 1)
    throw std::invalid_argument(
        "GeneratorOptions.min_objects = " + std::to_string(opts.min_objects) +
        " must be at least 1 so every scene has a caption");
  if (opts.min_objects > opts.max_objects)
    throw std::invalid_argument(
        "GeneratorOptions.min_objects (" + std::to_string(opts.min_objects) + ") > max_objects (" +
        std::to_string(opts.max_objects) + "); set min_objects <= max_objects");
  check_vocab("shapes", opts.shapes, all_shapes());
  check_vocab("colours", opts.colours, all_colours());
  check_vocab("sizes", opts.sizes, all_sizes());

  const size_t triples = opts.shapes.size() * opts.colours.size() * opts.sizes.size();
  if (static_cast<size_t>(opts.max_objects) > triples)
    throw std::invalid_argument(
        "GeneratorOptions.max_objects = " + std::to_string(opts.max_objects) + " exceeds the " +
        std::to_string(triples) +
        " distinct (shape, colour, size) combinations the lists allow; lower max_objects or "
        "list more shapes/colours/sizes");

  // Two grid-packing bounds (see placement_capacity): max_objects must fit at the mean object
  // size (beyond that random placement cannot reach the count), and min_objects must fit even
  // when every object has the largest size (so sample_scene never runs out of options).
  std::string largest;
  float r_max = 0, r_sum = 0;
  for (const auto& s : opts.sizes) {
    const float r = size_radius_px(s, opts.image_size);
    r_sum += r;
    if (r > r_max) r_max = r, largest = s;
  }
  const float r_mean = r_sum / static_cast<float>(opts.sizes.size());
  const std::string side = std::to_string(opts.image_size);
  const int cap_mean = placement_capacity(r_mean, opts.image_size);
  if (opts.max_objects > cap_mean)
    throw std::invalid_argument(
        "GeneratorOptions.max_objects = " + std::to_string(opts.max_objects) +
        " is more than can be placed without overlap in a " + side + "x" + side +
        " image with sizes [" + join(opts.sizes) + "] (at most " + std::to_string(cap_mean) +
        "); lower max_objects, raise image_size or use smaller sizes");
  const int cap_large = placement_capacity(r_max, opts.image_size);
  if (opts.min_objects > cap_large)
    throw std::invalid_argument(
        "GeneratorOptions.min_objects = " + std::to_string(opts.min_objects) +
        " cannot always be placed: a " + side + "x" + side + " image fits at most " +
        std::to_string(cap_large) + " '" + largest +
        "' objects; lower min_objects, raise image_size or drop the larger sizes");
}

// ---------------------------------------------------------------------------------------------
// RNG and seeding
// ---------------------------------------------------------------------------------------------
uint64_t scene_seed(uint64_t seed, const std::string& split, int64_t index) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ fnv1a64(split));
  h = splitmix64(h ^ static_cast<uint64_t>(index));
  return h;
}

std::string scene_id(const std::string& split, int64_t index) {
  return split + "-" + padded_index(index);
}

Rng::Rng(uint64_t seed) {
  // Fill the state from a splitmix64 stream (the seeding the xoshiro authors recommend);
  // it is never all zero for any seed.
  uint64_t x = seed;
  for (auto& s : s_) {
    s = splitmix64(x);
    x += 0x9E3779B97F4A7C15ull;
  }
}

uint64_t Rng::next_u64() {
  auto rotl = [](uint64_t v, int k) { return (v << k) | (v >> (64 - k)); };
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

int64_t Rng::uniform_int(int64_t lo, int64_t hi) {
  if (lo > hi) throw std::invalid_argument("Rng::uniform_int: lo > hi");
  const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) + 1;
  if (range == 0) return static_cast<int64_t>(next_u64());  // full 64-bit range
  // Reject the (2^64 mod range) lowest values so the rest split into equal buckets.
  const uint64_t threshold = (0 - range) % range;
  uint64_t x;
  do {
    x = next_u64();
  } while (x < threshold);
  return static_cast<int64_t>(static_cast<uint64_t>(lo) + x % range);
}

float Rng::uniform_float() { return static_cast<float>(next_u64() >> 40) * (1.0f / 16777216.0f); }

float Rng::uniform_float(float lo, float hi) {
  const float v = lo + (hi - lo) * uniform_float();
  return v < hi ? v : lo;  // guard against rounding up to hi
}

// ---------------------------------------------------------------------------------------------
// Scenes
// ---------------------------------------------------------------------------------------------
std::string spatial_relation(const Object& subject, const Object& object) {
  const double dx = static_cast<double>(object.cx) - subject.cx;
  const double dy = static_cast<double>(object.cy) - subject.cy;
  if (std::fabs(dx) >= std::fabs(dy)) return dx >= 0 ? "left of" : "right of";
  return dy > 0 ? "above" : "below";
}

std::vector<Relation> compute_relations(const std::vector<Object>& objects) {
  std::vector<Relation> out;
  const int n = static_cast<int>(objects.size());
  if (n > 1) out.reserve(static_cast<size_t>(n) * static_cast<size_t>(n - 1));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      if (i != j) out.push_back({i, j, spatial_relation(objects[i], objects[j])});
  return out;
}

Scene sample_scene(const GeneratorOptions& opts, const std::string& split, int64_t index) {
  validate(opts);
  Rng rng(scene_seed(opts.seed, split, index));
  Scene scene;
  scene.id = scene_id(split, index);
  const int wanted = static_cast<int>(rng.uniform_int(opts.min_objects, opts.max_objects));
  // Restart with fresh attributes and positions when placement gets stuck; only if that keeps
  // failing, fall back to fewer objects (never below min_objects).
  for (int n = wanted; n >= opts.min_objects; --n) {
    for (int attempt = 0; attempt < kSceneAttempts; ++attempt) {
      std::vector<Object> objects = sample_attributes(opts, n, rng);
      if (!place_objects(objects, opts.image_size, rng)) continue;
      // Store objects left to right so object index order matches caption order.
      std::stable_sort(objects.begin(), objects.end(), [](const Object& a, const Object& b) {
        return a.cx != b.cx ? a.cx < b.cx : a.cy < b.cy;
      });
      scene.objects = std::move(objects);
      scene.relations = compute_relations(scene.objects);
      return scene;
    }
  }
  throw std::runtime_error("sample_scene: could not place " + std::to_string(opts.min_objects) +
                           " non-overlapping objects for " + scene.id + " in a " +
                           std::to_string(opts.image_size) +
                           " px image; lower min_objects or "
                           "raise image_size");
}

cv::Mat render(const Scene& scene, int image_size) {
  if (image_size <= 0)
    throw std::invalid_argument("render: image_size must be positive, got " +
                                std::to_string(image_size));
  const cv::Vec3b bg = background_rgb();
  cv::Mat img(image_size, image_size, CV_8UC3, cv::Scalar(bg[2], bg[1], bg[0]));
  for (const Object& o : scene.objects) {
    const cv::Vec3b rgb = colour_rgb(o.colour);
    const cv::Scalar bgr(rgb[2], rgb[1], rgb[0]);
    if (o.shape == "circle") {
      cv::circle(img, cv::Point(to_fixed(o.cx), to_fixed(o.cy)), to_fixed(o.radius), bgr,
                 cv::FILLED, cv::LINE_AA, kShift);
      continue;
    }
    const Outline& unit = outline_of(o.shape);
    std::vector<std::vector<cv::Point>> poly(1);
    poly[0].reserve(unit.size());
    for (const auto& [ux, uy] : unit)
      poly[0].emplace_back(
          to_fixed(static_cast<double>(o.cx) + static_cast<double>(ux) * o.radius),
          to_fixed(static_cast<double>(o.cy) + static_cast<double>(uy) * o.radius));
    cv::fillPoly(img, poly, bgr, cv::LINE_AA, kShift);
  }
  return img;
}

std::string describe(const Object& object) {
  return object.size + " " + object.colour + " " + object.shape;
}

std::string caption(const Scene& scene) {
  const auto& objs = scene.objects;
  std::vector<size_t> order(objs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (objs[a].cx != objs[b].cx) return objs[a].cx < objs[b].cx;
    return objs[a].cy < objs[b].cy;
  });
  std::string out;
  for (size_t k = 0; k < order.size(); ++k) {
    if (k) out += " " + spatial_relation(objs[order[k - 1]], objs[order[k]]) + " ";
    out += "a " + describe(objs[order[k]]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------
json to_json(const Scene& scene) {
  json objects = json::array();
  for (const Object& o : scene.objects)
    objects.push_back({{"shape", o.shape},
                       {"colour", o.colour},
                       {"size", o.size},
                       {"cx", o.cx},
                       {"cy", o.cy},
                       {"radius", o.radius}});
  json relations = json::array();
  for (const Relation& r : scene.relations)
    relations.push_back({{"subject", r.subject}, {"object", r.object}, {"predicate", r.predicate}});
  return {{"id", scene.id}, {"objects", std::move(objects)}, {"relations", std::move(relations)}};
}

Scene scene_from_json(const json& j) {
  Scene s;
  s.id = string_field(j, "id", "scene");
  const json& objects = array_field(j, "objects", "scene");
  for (size_t i = 0; i < objects.size(); ++i) {
    const std::string where = "scene.objects[" + std::to_string(i) + "]";
    const json& jo = objects[i];
    Object o;
    o.shape = string_field(jo, "shape", where);
    o.colour = string_field(jo, "colour", where);
    o.size = string_field(jo, "size", where);
    o.cx = number_field(jo, "cx", where);
    o.cy = number_field(jo, "cy", where);
    o.radius = number_field(jo, "radius", where);
    s.objects.push_back(std::move(o));
  }
  const json& relations = array_field(j, "relations", "scene");
  for (size_t i = 0; i < relations.size(); ++i) {
    const std::string where = "scene.relations[" + std::to_string(i) + "]";
    const json& jr = relations[i];
    Relation r;
    r.subject = int_field(jr, "subject", where);
    r.object = int_field(jr, "object", where);
    r.predicate = string_field(jr, "predicate", where);
    const int n = static_cast<int>(s.objects.size());
    if (r.subject < 0 || r.subject >= n || r.object < 0 || r.object >= n)
      throw std::invalid_argument("scene JSON: field '" + where +
                                  "' refers to an object index outside 0.." +
                                  std::to_string(n - 1));
    s.relations.push_back(std::move(r));
  }
  return s;
}

json to_json(const GeneratorOptions& opts) {
  return {{"image_size", opts.image_size},
          {"min_objects", opts.min_objects},
          {"max_objects", opts.max_objects},
          {"shapes", opts.shapes},
          {"colours", opts.colours},
          {"sizes", opts.sizes},
          {"seed", opts.seed}};
}

GeneratorOptions options_from_json(const json& j) {
  if (!j.is_object()) throw std::invalid_argument("shapes_world options must be a JSON object");
  GeneratorOptions o;
  const std::vector<std::string> known = {"image_size", "min_objects", "max_objects", "shapes",
                                          "colours",    "sizes",       "seed"};
  for (const auto& item : j.items()) {
    const std::string& key = item.key();
    const json& v = item.value();
    auto need_int = [&]() {
      if (!v.is_number_integer())
        throw std::invalid_argument("shapes_world options: '" + key + "' must be an integer");
      return v.get<int64_t>();
    };
    auto need_strings = [&]() {
      if (!v.is_array())
        throw std::invalid_argument("shapes_world options: '" + key +
                                    "' must be a list of strings");
      std::vector<std::string> out;
      for (const auto& e : v) {
        if (!e.is_string())
          throw std::invalid_argument("shapes_world options: '" + key +
                                      "' must be a list of strings");
        out.push_back(e.get<std::string>());
      }
      return out;
    };
    auto small_int = [&]() {
      const int64_t x = need_int();
      if (x < std::numeric_limits<int>::min() || x > std::numeric_limits<int>::max())
        throw std::invalid_argument("shapes_world options: '" + key + "' is out of range");
      return static_cast<int>(x);
    };
    if (key == "image_size")
      o.image_size = small_int();
    else if (key == "min_objects")
      o.min_objects = small_int();
    else if (key == "max_objects")
      o.max_objects = small_int();
    else if (key == "shapes")
      o.shapes = need_strings();
    else if (key == "colours")
      o.colours = need_strings();
    else if (key == "sizes")
      o.sizes = need_strings();
    else if (key == "seed") {
      if (v.is_number_unsigned())
        o.seed = v.get<uint64_t>();
      else if (v.is_number_integer() && v.get<int64_t>() >= 0)
        o.seed = static_cast<uint64_t>(v.get<int64_t>());
      else
        throw std::invalid_argument("shapes_world options: 'seed' must be a non-negative integer");
    } else {
      throw std::invalid_argument("shapes_world options: unknown key '" + key +
                                  "'; known keys are: " + join(known));
    }
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// Dataset writer
// ---------------------------------------------------------------------------------------------
WriteSummary write_dataset(const std::string& out_dir, int64_t n_train, int64_t n_val,
                           const GeneratorOptions& opts,
                           const std::function<void(int64_t, int64_t)>& progress) {
  validate(opts);
  if (n_train < 0 || n_val < 0)
    throw std::invalid_argument("write_dataset: scene counts must be >= 0 (got train=" +
                                std::to_string(n_train) + ", val=" + std::to_string(n_val) + ")");

  const fs::path root(out_dir);
  auto make_dir = [](const fs::path& p) {
    std::error_code ec;
    fs::create_directories(p, ec);
    if (ec || !fs::is_directory(p))
      throw std::runtime_error("write_dataset: cannot create directory '" + p.string() +
                               "': " + (ec ? ec.message() : "not a directory"));
  };
  make_dir(root);

  const int64_t total = n_train + n_val;
  const int64_t step = std::max<int64_t>(1, total / 100);
  int64_t done = 0;
  const std::vector<int> png_params = {cv::IMWRITE_PNG_COMPRESSION, 6};

  auto write_split = [&](const std::string& split, int64_t count) {
    const fs::path image_dir = root / "images" / split;
    make_dir(image_dir);
    const fs::path manifest = root / (split + ".jsonl");
    std::ofstream out(manifest, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("write_dataset: cannot open '" + manifest.string() + "'");
    for (int64_t i = 0; i < count; ++i) {
      const Scene scene = sample_scene(opts, split, i);
      const std::string name = padded_index(i) + ".png";
      const fs::path png = image_dir / name;
      bool ok = false;
      std::string why = "cv::imwrite returned false";
      try {
        ok = cv::imwrite(png.string(), render(scene, opts.image_size), png_params);
      } catch (const cv::Exception& e) {
        why = e.what();
      }
      if (!ok)
        throw std::runtime_error("write_dataset: cannot write '" + png.string() + "': " + why);

      const json record = {{"id", scene.id},
                           {"image", "images/" + split + "/" + name},
                           {"caption", caption(scene)},
                           {"negatives", to_json(hard_negatives(scene, opts, negatives_seed(opts.seed, split, i)))},
                           {"scene", to_json(scene)}};
      out << record.dump() << '\n';
      if (!out) throw std::runtime_error("write_dataset: cannot write '" + manifest.string() + "'");

      ++done;
      if (progress && (done % step == 0 || done == total)) progress(done, total);
    }
    out.close();
    if (!out) throw std::runtime_error("write_dataset: cannot write '" + manifest.string() + "'");
    return manifest.string();
  };

  WriteSummary summary;
  summary.train_manifest = write_split("train", n_train);
  summary.train = n_train;
  summary.val_manifest = write_split("val", n_val);
  summary.val = n_val;
  if (progress && total == 0) progress(0, 0);

  // A self-describing record of how the data was made (written last: its presence means the
  // dataset is complete).
  json colours = json::object();
  for (const auto& c : kColours) colours[c.name] = {c.r, c.g, c.b};
  json sizes = json::object();
  for (const auto& s : kSizes) sizes[s.name] = s.fraction;
  const json meta = {{"generator", "trialign.shapes_world"},
                     // 2: train_pref / val_pref also hold yes/no pairs (data/shapes_preference.h)
                     // 3: existence questions also name a shape alone (data/shapes_questions.h)
                     // 4: position questions ("Where is the red circle?")
                     // 5: the yes/no pairs move to train_pref_yesno / val_pref_yesno
                     {"format_version", 5},
                     {"options", to_json(opts)},
                     {"train", n_train},
                     {"val", n_val},
                     {"train_manifest", "train.jsonl"},
                     {"val_manifest", "val.jsonl"},
                     {"colours_rgb", colours},
                     {"background_rgb", {kBackground[0], kBackground[1], kBackground[2]}},
                     {"size_fractions", sizes}};
  const fs::path meta_path = root / "shapes_world.json";
  std::ofstream mf(meta_path, std::ios::binary | std::ios::trunc);
  if (!mf) throw std::runtime_error("write_dataset: cannot open '" + meta_path.string() + "'");
  mf << meta.dump(2) << '\n';
  mf.close();
  if (!mf) throw std::runtime_error("write_dataset: cannot write '" + meta_path.string() + "'");
  return summary;
}

std::ostream& operator<<(std::ostream& os, const Object& o) {
  return os << describe(o) << " @(" << o.cx << ", " << o.cy << ") r " << o.radius;
}

std::ostream& operator<<(std::ostream& os, const Relation& r) {
  return os << r.subject << " " << r.predicate << " " << r.object;
}

std::ostream& operator<<(std::ostream& os, const Scene& s) { return os << to_json(s).dump(); }

}  // namespace trialign::shapes
