// jetinfer's patch: only BERT and the modules it uses are kept
// (vendor/candle-transformers/README.md).
pub mod bert;
pub mod with_tracing;
