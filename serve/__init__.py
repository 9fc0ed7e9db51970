"""MedLLaVA serving: a Gradio chat and an OpenAI-compatible API from one process over one `respond` generator.

Usage:
    python -m serve --model default --host 127.0.0.1 --port 7860      # `make demo`
"""
