"""Controller: adapter inventory, canary rollouts and the LoRA-aware endpoint picker."""
