"""The language-model side: the base model (`base_model`), how a conversation becomes tokens
(`chat_format`), packed batches and the loss (`packing`), the best pass by held-out loss (`passes`), the adapter folders (`adapters`),
generation (`infer`), evaluation (`evals`) with its judge of style (`judge`, scikit-learn) and adapter exports for other servers (`export`).

Owns everything that imports torch, transformers or peft (inside functions, so importing the
package costs nothing). Knows nothing of HTTP, the job registry or how a job is run.
"""
