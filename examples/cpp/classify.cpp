// Load a `transfer export` model.pt with libtorch alone, classify an image tensor, name the class.
//
//   classify MODEL.pt [R G B]   -> "<class> <probability>" for a 480x640 image of one colour
//
// With real images, decode them yourself (e.g. OpenCV) into RGB uint8 and wrap them, e.g.
//   torch::from_blob(rgb.data, {1, rows, cols, 3}, torch::kUInt8).permute({0, 3, 1, 2})
// The model resizes, crops and normalizes inside, exactly as at extraction.
#include <torch/script.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <unordered_map>

int main(int argc, char** argv) {
  if (argc != 2 && argc != 5) {
    std::cerr << "usage: classify MODEL.pt [R G B]\n";
    return 2;
  }
  std::unordered_map<std::string, std::string> extra{{"transfer.json", ""}};  // filled by load
  torch::jit::Module model = torch::jit::load(argv[1], torch::kCPU, extra);
  auto classes = model.attr("classes").toList();  // names of the outputs, in order

  auto images = torch::empty({1, 3, 480, 640}, torch::kUInt8);  // (N, 3, H, W), any H and W
  for (int c = 0; c < 3; ++c) {
    images.select(1, c).fill_(argc == 5 ? std::atoi(argv[2 + c]) : 128);
  }
  torch::NoGradGuard no_grad;
  torch::Tensor probs = model.forward({images}).toTensor();  // (N, K) probabilities

  int64_t best = probs[0].argmax().item<int64_t>();
  std::cout << classes.get(best).toStringRef() << " " << probs[0][best].item<float>() << "\n";
  return 0;
}
