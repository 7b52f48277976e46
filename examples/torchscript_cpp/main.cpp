// Run a TorchScript archive written by `mlops export jit` from C++, without Python.
//
// Usage: run_torchscript MODEL.pt SHAPE:DTYPE [SHAPE:DTYPE ...]
//   one SHAPE:DTYPE per input, in the archive's positional order (the export report's "Inputs" table, also
//   stored in the archive as extra/mlops.json and printed here), e.g. for the tiny BERT classifier:
//   run_torchscript bert.pt 2x16:int64 2x16:int64 2x16:int64
//
// Integer inputs are filled with ones (valid token ids, an attention mask without padding); float inputs
// with torch::randn after torch::manual_seed(0), the same values Python's torch.randn gives after
// torch.manual_seed(0). Each output is printed as `name: shape=[...] sum=... first=[...]`.
#include <torch/script.h>

#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

torch::Dtype parse_dtype(const std::string& name) {
  if (name == "float32" || name == "float") return torch::kFloat32;
  if (name == "float64") return torch::kFloat64;
  if (name == "int64" || name == "long") return torch::kInt64;
  if (name == "int32" || name == "int") return torch::kInt32;
  if (name == "bool") return torch::kBool;
  throw std::invalid_argument("unknown dtype '" + name + "' (use float32, float64, int64, int32 or bool)");
}

// "2x16:int64" -> a tensor of that shape and dtype.
torch::Tensor make_input(const std::string& spec) {
  const auto colon = spec.find(':');
  if (colon == std::string::npos) throw std::invalid_argument("input '" + spec + "' is not SHAPE:DTYPE");
  std::vector<int64_t> sizes;
  std::stringstream dims(spec.substr(0, colon));
  for (std::string dim; std::getline(dims, dim, 'x');) sizes.push_back(std::stoll(dim));
  const auto dtype = parse_dtype(spec.substr(colon + 1));
  if (torch::isFloatingType(dtype)) return torch::randn(sizes, torch::TensorOptions().dtype(dtype));
  return torch::ones(sizes, torch::TensorOptions().dtype(dtype));
}

void print_tensor(const std::string& name, const torch::Tensor& tensor) {
  const auto values = tensor.detach().to(torch::kFloat64).flatten();
  std::cout << name << ": shape=" << tensor.sizes() << std::setprecision(8) << " sum=" << values.sum().item<double>()
            << " first=[";
  for (int64_t i = 0; i < std::min<int64_t>(4, values.numel()); ++i) {
    std::cout << (i ? ", " : "") << values[i].item<double>();
  }
  std::cout << "]\n";
}

// Outputs are a tensor, a dict of named tensors (Hugging Face models) or a tuple of tensors.
void print_output(const torch::jit::IValue& output) {
  if (output.isTensor()) {
    print_tensor("output", output.toTensor());
  } else if (output.isGenericDict()) {
    for (const auto& item : output.toGenericDict()) print_tensor(item.key().toStringRef(), item.value().toTensor());
  } else if (output.isTuple()) {
    const auto& elements = output.toTupleRef().elements();
    for (size_t i = 0; i < elements.size(); ++i) print_tensor("output_" + std::to_string(i), elements[i].toTensor());
  } else {
    std::cout << "output: " << output.tagKind() << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt SHAPE:DTYPE [SHAPE:DTYPE ...]   e.g. 2x16:int64\n";
    return 2;
  }
  torch::jit::ExtraFilesMap extra_files{{"mlops.json", ""}};
  torch::jit::Module module;
  try {
    module = torch::jit::load(argv[1], torch::kCPU, extra_files);
  } catch (const c10::Error& error) {
    std::cerr << "error: cannot load " << argv[1] << ": " << error.what_without_backtrace() << "\n";
    return 3;
  }
  module.eval();
  if (!extra_files["mlops.json"].empty()) std::cout << "mlops.json: " << extra_files["mlops.json"] << "\n";

  torch::manual_seed(0);
  std::vector<torch::jit::IValue> inputs;
  try {
    for (int i = 2; i < argc; ++i) inputs.emplace_back(make_input(argv[i]));
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 2;
  }
  torch::InferenceMode inference_mode;
  try {
    print_output(module.forward(inputs));
  } catch (const c10::Error& error) {
    std::cerr << "error: forward failed: " << error.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
