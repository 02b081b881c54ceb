"""What others released, read here without running any of their code: weights, tokenizers, and the downloads.

weights.py        any weights file or release name -> a checkpoint in our format
convert.py        OpenAI's and open_clip's CLIP and SigLIP state dicts renamed onto model.py
files.py          TorchScript archives (an allow-list) and torch.save files read within their real size
safetensors_reader.py  .safetensors files, the header checked as the safetensors library checks it
tokenizers.py     CLIP's byte-level BPE and SigLIP's SentencePiece tokenizer, from scratch
sentencepiece.py  a SentencePiece .model file read and run (unigram Viterbi)
download.py       named files fetched once into a cache and checked (SHA-256); transfer.py, the HTTP part
disk.py           files written whole or not at all (downloads, checkpoints, caches), JSON read without trust
"""
