// CRD sources only: nothing here is built. The tests read the YAML from the module cache.
module picotun.dev/testground/crds

go 1.26.0

require (
	github.com/cert-manager/cert-manager v1.20.2 // indirect
	sigs.k8s.io/gateway-api v1.5.1 // indirect
)
