//go:build !race

package sim

// defaultSeeds is how many seeds a plain go test runs (about 15 s on two
// cores); SENDONCE_SIM_SEEDS overrides it.
const defaultSeeds = 500
