"""Tokenizer and chat formats: a checkpoint's tokenizer.json plus its chat template, written out in Python.

Unforgotten Safety fine-tunes an aligned chat model and measures how much of its safety survives. The
model's refusals were learned in one exact prompt format, so we train and evaluate in that format:
`render` returns the same text as the checkpoint's Hugging Face chat template (tested against
transformers' own rendering), using only the `tokenizers` library at run time (no transformers, no jinja).

Formats, detected from signatures in the chat template (or passed as `chat_format=` / --chat-format):
  llama2   Llama-2-chat: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>
  llama3   Llama-3: <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>. Llama-3.1/3.2
           templates also open with a system block holding "Today Date: {date}"; transformers fills in
           the current day, we always use the template's own fallback date (26 Jul 2024), so the
           training data does not change from one day to the next.
  mistral  Mistral-7B-Instruct [INST] ... [/INST]: the v0.1/v0.2 template, the v0.3 ("v3") template, and
           the original v0.2/Mixtral template without a system prompt.
  gemma    Gemma 1 and 2 -it: <start_of_turn>user / model ... <end_of_turn>; a system message is an error.
  gemma3   Gemma 3: the same turns; a system message goes before the first user message, then a blank line.
  chatml   Qwen2/2.5, SmolLM2: <|im_start|>{role}\\n{content}<|im_end|>\\n, with the default system
           prompt the template inserts when the conversation has none (read from the template).
  qwen3    Qwen3: ChatML with a <think> block. Thinking is off by default: the generation prompt ends with an
           empty <think>\\n\\n</think>\\n\\n, as apply_chat_template(enable_thinking=False); thinking=True
           (--thinking) leaves it out and the model thinks. The last answer after the last user turn shows its
           reasoning (or an empty block); earlier answers lose theirs, as the template does.
A checkpoint without a chat template needs --chat-format: the error names the format its special tokens
and model_type suggest, but a guess is never used silently.
"""
import json
import os
import re

from tokenizers import Tokenizer as _Tokenizers

FORMATS = ("llama2", "llama3", "mistral", "gemma", "gemma3", "chatml", "qwen3")
# First match wins (every string must be in the template): Qwen3's before ChatML's, Gemma 3's before Gemma's,
# Llama-2's template contains both <<SYS>> and [INST], so <<SYS>> comes first.
_SIGNATURES = [(("<|im_start|>", "enable_thinking"), "qwen3"), (("<|im_start|>",), "chatml"),
               (("<|start_header_id|>",), "llama3"), (("<start_of_turn>", "first_user_prefix"), "gemma3"),
               (("<start_of_turn>",), "gemma"), (("<<SYS>>",), "llama2"), (("[INST]",), "mistral")]
# Without a template: special tokens of the vocabulary (Qwen3's <think>, Gemma 3's image tokens), then model_type
_TOKENS = [(("<|im_start|>", "<think>"), "qwen3"), (("<|im_start|>",), "chatml"), (("<|start_header_id|>",), "llama3"),
           (("<start_of_turn>", "<start_of_image>"), "gemma3"), (("<start_of_turn>",), "gemma")]
_MODEL_TYPES = {"llama": "llama2", "mistral": "mistral", "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma3",
                "gemma3": "gemma3", "qwen2": "chatml", "qwen3": "qwen3"}
_END_OF_TURN = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "gemma3": "<end_of_turn>", "chatml": "<|im_end|>",
                "qwen3": "<|im_end|>"}
# The Mistral templates differ in spaces and in which user turn carries the system prompt:
# (text before "[INST] ", before "[/INST]", before an answer, strip the answer, turn with the system prompt)
_MISTRAL = {"v1": (" ", " ", " ", False, "first"),  # v0.1/v0.2 as published since mid-2024
            "v3": ("", "", " ", True, "last"),  # v0.3: the system prompt goes into the *last* user turn
            "v0": ("", " ", "", False, None)}  # the original v0.2/Mixtral template: no system role


def _content(tok):
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _ids(v):
    return [] if v is None else [v] if isinstance(v, int) else list(v)


class Tokenizer:
    def __init__(self, tok, bos_token, eos_token, pad_token=None, chat_template="", chat_format=None,
                 add_bos=None, extra_stop_ids=(), model_type=None, source="tokenizer", thinking=False):
        self.tok = tok
        # Some tokenizer.json files carry padding/truncation settings; ours must return whole texts.
        tok.no_padding()
        tok.no_truncation()
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._id(bos_token, "bos_token", source) if bos_token else None
        if not eos_token:
            raise ValueError(f"{source}: no eos_token in tokenizer_config.json or eos_token_id in config.json")
        self.eos_id = self._id(eos_token, "eos_token", source)
        self.pad_id = self._id(pad_token, "pad_token", source) if pad_token else self.eos_id

        fmt = chat_format or self._detect(chat_template, model_type)
        if fmt is None:
            raise ValueError(f"{source}: cannot tell the chat format from tokenizer_config.json's chat_template "
                             f"or config.json's model_type {model_type!r}; pass --chat-format")
        if not chat_format and not chat_template:  # a guess from special tokens or model_type: the user decides
            raise ValueError(f"{source}: tokenizer_config.json has no chat_template; its tokens and model_type suggest "
                             f"the {fmt!r} format: pass --chat-format {fmt} to train and evaluate in it")
        if fmt not in FORMATS:
            raise ValueError(f"unknown chat format {fmt!r} (--chat-format); expected one of {', '.join(FORMATS)}")
        self.chat_format = fmt
        if thinking and fmt != "qwen3":
            raise ValueError(f"--thinking: only the qwen3 chat format thinks, not {fmt!r}")
        self.thinking = thinking
        t = chat_template or ""
        # chatml: the literal system prompt the template inserts when the conversation has none.
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"+]*?)<\|im_end\|>", t) if fmt == "chatml" else None
        self.default_system = m.group(1).replace("\\n", "\n") if m else None
        # llama3.1+: the date lines of the system block, with the template's fallback date.
        self.llama3_system = None
        if fmt == "llama3" and "Cutting Knowledge Date" in t:
            cutoff = re.search(r'Cutting Knowledge Date: ([^"\\]*)', t).group(1)
            date = re.search(r'date_string = "([^"]*)"', t)
            date = date.group(1) if date else "26 Jul 2024"
            self.llama3_system = f"Cutting Knowledge Date: {cutoff}\nToday Date: {date}\n\n"
        # mistral: v1 opens turns with ' [INST] ', v3 closes them with no space before [/INST], v0 neither.
        self.mistral = "v1" if "' [INST] '" in t or not t else "v3" if re.search(r"['\"]\[/INST\]['\"]", t) else "v0"
        # Encoding raw text (not a chat) starts with bos when the tokenizer says so; chat encodings take
        # bos from the template text itself, as transformers' apply_chat_template does.
        default_bos = fmt not in ("chatml", "qwen3")
        self.add_bos = self.bos_id is not None and (default_bos if add_bos is None else bool(add_bos))
        eot = tok.token_to_id(_END_OF_TURN.get(fmt, eos_token))
        self.stop_ids = {self.eos_id, *extra_stop_ids} | ({eot} if eot is not None else set())

    def _id(self, token, name, source):
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{source}: {name} {token!r} is not in tokenizer.json")
        return i

    def _detect(self, template, model_type):
        for sigs, fmt in _SIGNATURES:
            if all(s in (template or "") for s in sigs):
                return fmt
        if template:  # a template of another family: guessing would silently train in the wrong format
            return None
        for tokens, fmt in _TOKENS:  # no template: the family's special tokens, then model_type
            if all(self.tok.token_to_id(t) is not None for t in tokens):
                return fmt
        return _MODEL_TYPES.get(model_type)

    @classmethod
    def from_pretrained(cls, path, chat_format=None, thinking=False):
        def read(name):
            f = os.path.join(path, name)
            if not os.path.exists(f):
                return {}
            with open(f) as fh:
                try:
                    return json.load(fh)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{e.lineno}: invalid JSON ({e.msg})") from None

        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise FileNotFoundError(f"{tok_file} not found")
        tcfg, cfg, gcfg = read("tokenizer_config.json"), read("config.json"), read("generation_config.json")
        try:
            tok = _Tokenizers.from_file(tok_file)
        except Exception as e:  # the tokenizers library raises its own exception type
            raise ValueError(f"{tok_file}: cannot read ({e})") from None
        # A tokenizer with more ids than the model's embedding would index past it; fewer is fine
        # (many checkpoints pad the embedding to a multiple of 64 or 128).
        n_ids = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if isinstance(cfg.get("vocab_size"), int) and n_ids > cfg["vocab_size"]:
            raise ValueError(f"{tok_file}: token ids go up to {n_ids - 1}, but config.json's vocab_size is "
                             f"{cfg['vocab_size']}: the tokenizer does not belong to this model")
        name = lambda ids: tok.id_to_token(ids[0]) if ids else None  # config.json ids back to token text
        template = tcfg.get("chat_template") or ""
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), "")
        jinja_file = os.path.join(path, "chat_template.jinja")  # newer transformers save it on its own
        if os.path.exists(jinja_file):
            with open(jinja_file) as fh:
                template = fh.read()
        return cls(tok,
                   bos_token=_content(tcfg.get("bos_token")) or name(_ids(cfg.get("bos_token_id"))),
                   eos_token=_content(tcfg.get("eos_token")) or name(_ids(cfg.get("eos_token_id"))),
                   pad_token=_content(tcfg.get("pad_token")), chat_template=template, chat_format=chat_format,
                   add_bos=tcfg.get("add_bos_token"), model_type=cfg.get("model_type"), source=path, thinking=thinking,
                   extra_stop_ids=_ids(gcfg.get("eos_token_id")) + _ids(cfg.get("eos_token_id")))

    def encode(self, text, bos=False):
        ids = self.tok.encode(text, add_special_tokens=False).ids  # specials in text are parsed as specials
        if bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special=True):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)  # lists or tensors

    def _pieces(self, messages, gen):
        """The rendered chat as (text, is_target) pieces; targets are assistant content + end of turn."""
        if not messages:
            raise ValueError("empty conversation")
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unsupported role {m['role']!r}")
        f, bos, eos = self.chat_format, self.bos_token or "", self.eos_token
        system, rest = (messages[0]["content"], messages[1:]) if messages[0]["role"] == "system" else (None, messages)
        out = []
        if f == "chatml":
            if system is None and self.default_system is not None:
                out.append((f"<|im_start|>system\n{self.default_system}<|im_end|>\n", False))
            for m in messages:
                if m["role"] == "assistant":
                    out += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
                else:
                    out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
            return out + ([("<|im_start|>assistant\n", False)] if gen else [])
        if f == "qwen3":
            return out + self._qwen3(messages, gen)
        if f == "llama3":
            out.append((bos, False))
            if self.llama3_system is not None:  # 3.1+: the system block is always there, date lines first
                sys_block = self.llama3_system + (system or "").strip()
                out.append((f"<|start_header_id|>system<|end_header_id|>\n\n{sys_block}<|eot_id|>", False))
                messages = rest
            for m in messages:
                head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                if m["role"] == "assistant":
                    out += [(head, False), (m["content"].strip() + "<|eot_id|>", True)]
                else:
                    out.append((head + m["content"].strip() + "<|eot_id|>", False))
            return out + ([("<|start_header_id|>assistant<|end_header_id|>\n\n", False)] if gen else [])
        # llama2, mistral and gemma templates raise unless user and assistant alternate.
        if f == "gemma" and system is not None:
            raise ValueError("gemma's chat template does not support a system message")
        for i, m in enumerate(rest):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError(f"{f}: roles must alternate user/assistant after an optional system message")
        if f in ("gemma", "gemma3"):
            out.append((bos, False))
            prefix = "" if system is None else system + "\n\n"  # gemma3: the system prompt opens the first turn
            for i, m in enumerate(rest):
                head = f"<start_of_turn>{'model' if m['role'] == 'assistant' else 'user'}\n" + (prefix if i == 0 else "")
                if m["role"] == "assistant":
                    out += [(head, False), (m["content"].strip() + "<end_of_turn>", True), ("\n", False)]
                else:
                    out.append((head + m["content"].strip() + "<end_of_turn>\n", False))
            return out + ([("<start_of_turn>model\n", False)] if gen else [])
        if f == "llama2":  # no generation prompt: a prompt already ends with [/INST]
            for i, m in enumerate(rest):
                c = f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}" if i == 0 and system is not None else m["content"]
                if m["role"] == "user":
                    out.append((f"{bos}[INST] {c.strip()} [/INST]", False))
                else:
                    out += [(" ", False), (f"{c.strip()} {eos}", True)]
            return out
        before_inst, before_close, before_answer, strip, system_turn = _MISTRAL[self.mistral]
        if system is not None and system_turn is None:
            raise ValueError("this mistral chat template does not support a system message")
        system_i = 0 if system_turn == "first" else len(rest) - 1
        out.append((bos, False))
        for i, m in enumerate(rest):
            c = m["content"]
            if m["role"] == "user":
                c = f"{system}\n\n{c}" if system is not None and i == system_i else c
                out.append((f"{before_inst}[INST] {c}{before_close}[/INST]", False))
            else:
                out += [(before_answer, False), ((c.strip() if strip else c) + eos, True)]
        return out  # no generation prompt either

    def _qwen3(self, messages, gen):
        """Qwen3's template (tests/fixtures/chat_templates/qwen3-0.6b.jinja) for system/user/assistant turns. An answer
        after the last user turn shows a <think> block: its reasoning, learned as part of the answer, or an empty
        block in the prompt, as thinking-off generation prompts end; earlier answers are shown without reasoning."""
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
        out = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
                continue
            content, reasoning = m["content"], ""
            if "</think>" in content:
                content, reasoning = content.split("</think>")[-1].lstrip("\n"), \
                    content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            head = "<|im_start|>assistant\n"
            if i > last_user and (i == len(messages) - 1 or reasoning):
                think, content = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n", content.lstrip("\n")
                if reasoning.strip("\n"):
                    content = think + content  # the reasoning is part of what the model learns to write
                else:
                    head += think  # an empty block: the prompt, as a thinking-off generation prompt ends
            out += [(head, False), (content + "<|im_end|>", True), ("\n", False)]
        if gen:
            out.append(("<|im_start|>assistant\n" + ("" if self.thinking else "<think>\n\n</think>\n\n"), False))
        return out

    def render(self, messages, add_generation_prompt=False):
        return "".join(text for text, _ in self._pieces(messages, add_generation_prompt))

    def encode_chat(self, messages, add_generation_prompt=True):
        # The bos, if the format has one, is part of the rendered text, so it is never doubled.
        return self.encode(self.render(messages, add_generation_prompt))

    def encode_example(self, messages):
        """(ids, labels) for training: labels are -100 except on assistant content + end-of-turn marker."""
        if messages[-1]["role"] != "assistant":
            raise ValueError("a training example must end with an assistant message")
        text, spans = "", []
        for piece, target in self._pieces(messages, False):
            if target:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        # Encode the whole text once, so ids == encode_chat(messages, False) exactly, and label a token when
        # its characters overlap a target span: a token that straddles a boundary (SentencePiece's
        # "▁Sure" takes the space before the answer) is learned as part of the answer.
        enc = self.tok.encode(text, add_special_tokens=False)
        labels = [i if any(s < b and e > a for a, b in spans) else -100 for i, (s, e) in zip(enc.ids, enc.offsets)]
        return enc.ids, labels
