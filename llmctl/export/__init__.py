"""Export to other runtimes: `layout` (an llmctl model as a GGUF file for llama.cpp / ollama, through the `gguf`
package), `vocab` (its tokenizer as GGUF metadata), `verify` (llama.cpp's ids, tokens and logits against llmctl's)
and `modelfile` (ollama's Modelfile beside the GGUF)."""
