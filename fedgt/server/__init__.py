"""What the federation server runs: ServerApp, the GT translator, the shared LLM adapter, evaluation."""
