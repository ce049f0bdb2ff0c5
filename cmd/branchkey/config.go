package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/BurntSushi/toml"
	"github.com/spf13/pflag"
)

// envName returns the environment variable of a flag: BRANCHKEY_ plus the
// flag's name in upper case with '-' as '_'.
func envName(flag string) string {
	return "BRANCHKEY_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// applyEnvAndFile sets every flag not given on the command line from its
// BRANCHKEY_* environment variable, else from the TOML config file at path
// (if any). A key in the file that is no flag is an error, so typos do not
// pass silently.
func applyEnvAndFile(fs *pflag.FlagSet, path string) error {
	file := map[string]any{}
	if path != "" {
		md, err := toml.DecodeFile(path, &file)
		if err != nil {
			return fmt.Errorf("config file %s: %w", path, err)
		}
		for _, k := range md.Keys() {
			name := k.String()
			if f := fs.Lookup(name); f == nil || name == "config" {
				return fmt.Errorf("config file %s: unknown setting %q", path, name)
			}
		}
	}
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed || f.Name == "config" || f.Name == "help" {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", envName(f.Name), v, e)
			}
			return
		}
		if v, ok := file[f.Name]; ok {
			if e := fs.Set(f.Name, fmt.Sprint(v)); e != nil {
				err = fmt.Errorf("config file %s: %s = %v: %w", path, f.Name, v, e)
			}
		}
	})
	return err
}
