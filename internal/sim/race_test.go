//go:build race

package sim

// Under the race detector the pure-Go SQLite store is about 20 times
// slower; fewer seeds keep go test -race near 20 s on two cores.
const defaultSeeds = 30
