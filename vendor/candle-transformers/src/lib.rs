// jetinfer's patch: only BERT and the modules it uses are kept
// (vendor/candle-transformers/README.md).
pub mod models;
pub mod quantized_var_builder;
