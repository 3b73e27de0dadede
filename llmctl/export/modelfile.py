"""An ollama Modelfile for an exported GGUF: `FROM ./FILE.gguf`, the chat template in Go template syntax where it
is one llmctl can translate (its own ChatML template), and a `PARAMETER stop` for each end-of-sequence /
end-of-turn token. BOS is not in the template: llama.cpp (and so ollama) adds it by the file's add_bos_token."""

from __future__ import annotations

from llmctl.export.vocab import chat_template

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n")  # fmt: skip


def go_template(template: str | None) -> str | None:
    """The Go template of a Jinja chat template llmctl knows (llmctl's ChatML), else None."""
    from llmctl.tokenizer import CHAT_TEMPLATE

    return CHATML if template == CHAT_TEMPLATE else None


def modelfile(gguf_name: str, tok, ids: dict) -> str:
    template = chat_template(tok)
    lines = [f"FROM ./{gguf_name}"]
    go = go_template(template)
    if go:
        lines.append(f'TEMPLATE """{go}"""')
    elif template:
        lines.append("# The chat template (Jinja, in the GGUF's tokenizer.chat_template) has no Go translation here;")
        lines.append("# write a TEMPLATE for it, or let ollama pick one from the file.")
    stops = dict.fromkeys(tok.id_to_token(i) for i in (ids.get("eos"), ids.get("eot")) if i is not None)
    lines += [f'PARAMETER stop "{s}"' for s in stops if s and '"' not in s]
    return "\n".join(lines) + "\n"
