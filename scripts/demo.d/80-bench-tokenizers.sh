# Tokenizer implementations side by side: how fast each is, and whether they agree with the reference.
set -euo pipefail
# WordPiece: pure-Python BertTokenizerLegacy vs Rust-backed BertTokenizer vs the tokenizers library.
# --max-length 32 makes both texts of many pairs too long, which shows the longest-first tie difference.
mlops bench-tokenizers builtin:tiny-bert --max-length 32 --iterations 3
# Byte-level BPE (no pure-Python class in transformers 5): transformers vs tokenizers vs tiktoken,
# batches timed with 1 and 2 Rust worker threads, each setting in its own process.
mlops bench-tokenizers "$DEMO_OUT/tiny-gpt2" --threads 1,2 --iterations 3 --workload single --workload batch
