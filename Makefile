.PHONY: mlflow-ui

PORT ?= 5000

# MLflow UI over the embedded store (mlflow/mlflow.db) on 127.0.0.1:$(PORT).
mlflow-ui:
	PORT=$(PORT) bash mlflow/ui.sh
